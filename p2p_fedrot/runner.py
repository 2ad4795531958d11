"""The round loop: train -> align -> exchange -> mix -> evaluate -> log -> checkpoint.

Every process runs this loop for the peers it hosts. All decisions (graph of the round, mixing
weights, which parts train or travel) are computed identically on every process from the config
and the seed, so processes only exchange factors, never control messages.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint, methods, outputs
from .adapters import save_consensus_adapter, save_peer_adapters
from .config import RunConfig, dotted
from .data import build_data, pool
from .errors import ConfigError, P2PFedRotError
from .factors import FactorLayout
from .faults import corrupted
from .gossip import collect_mix_inputs, keeps_own_value, routes_of
from .io import atomic_write_json
from .metrics import aggregation_error, consensus_distance
from .model import CAUSAL_LM, build_peer_models, load_tokenizer, task_of
from .outputs import StartPlan
from .runtime import Runtime, agree, collective, init_runtime, launch_id, plain_process_name
from .schedule import MixingSchedule
from .topology import Topology, build_topology
from .training import PeerTrainer, evaluate
from .transport import Placement, Transport
from .validation import PayloadRules


POOLED_STREAM = 2**32 - 1  # seed key of the pooled learner's batches (never a peer id)
PER_PROCESS_KEYS = ("out", "threads", "comm.timeout_s")  # settings that may differ between a launch's processes
VERSIONED = ("torch", "transformers", "peft", "p2p_fedrot")  # packages whose versions every process must share


@dataclass
class RoundClock:
    """Seconds spent per phase in the current round."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("train", "align", "exchange", "eval"), 0.0))

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - since
        return now


def run(config: RunConfig) -> dict:
    """Run a whole experiment in this process (one of P under torchrun); returns the summary."""
    runtime = init_runtime(config.comm.backend, config.comm.timeout_s)
    torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // runtime.local_world))
    try:
        # before any work: a process launched with other settings must stop everyone at once
        name = Placement(config.peers, runtime.world, runtime.rank).process_name \
            if config.peers % runtime.world == 0 else plain_process_name
        agree(runtime, startup_header(config), "the configuration and package versions", config.comm.timeout_s, name)
        return Experiment(config, runtime).run()
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


def startup_header(config: RunConfig) -> dict[str, str]:
    """Every setting that all processes must share (dotted keys), and the versions of the packages
    that compute a round."""
    header = {key: repr(value) for key, value in dotted(config.to_dict()).items()
              if key not in PER_PROCESS_KEYS}
    for package in VERSIONED:
        header[f"version of {package}"] = importlib.metadata.version(package)
    return header


def digest(value: object) -> str:
    """A short fingerprint of a JSON-able value, for settings too long to compare by eye."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Experiment:
    """State of one run on one process: hosted peers, their data, trainers and the transport."""

    def __init__(self, config: RunConfig, runtime: Runtime) -> None:
        self.config, self.runtime = config, runtime
        self.placement = Placement(config.peers, runtime.world, runtime.rank)
        self.topology: Topology = build_topology(config.topology, config.peers, config.seed, config.allow_disconnected)
        self.clients = [p for p in range(config.peers) if not self.is_server(p)]
        causal_lm = task_of(config.model) == CAUSAL_LM
        tokenizer = load_tokenizer(config.model)
        self.data = build_data(config.data, self.clients, config.seed, tokenizer, config.model.max_length, causal_lm)
        local = list(self.placement.local_peers)
        self.models = build_peer_models(
            config.model, local, self.data.input_dim, self.data.num_classes, config.seed, runtime.device
        )
        self.layout: FactorLayout = self.models.layout
        self.schedule = MixingSchedule(self.topology, config.mixing,
                                       [len(self.data.clients[c].train) for c in self.clients],
                                       config.seed, config.participation)
        context = methods.MethodContext(self.layout, self.schedule.planning_gap(), self.topology.server,
                                        self.models.model)
        self.method = methods.make_method(config.method, config.method_args, context)
        if self.method.changes_base_weights and config.participation < 1:
            raise ConfigError(f"method {config.method} folds every round's residual into the base weights that all "
                              "peers of a process share, so every client must take part in every round; set "
                              "participation: 1")
        self.states = {p: methods.PeerState(p, self.models.flats[p]) for p in local}
        self.local_clients = [p for p in local if not self.is_server(p)]
        self.trainers = self.make_trainers()
        rule = config.train.optimizer_state
        self.reset_optimizer = rule == "reset" or (rule == "method" and self.method.resets_optimizer)
        self.transport = Transport(self.placement, runtime.device, config.comm.timeout_s, runtime.wire_device)
        self.rules = PayloadRules(config.comm.validate, config.comm.max_norm_ratio, config.comm.on_bad_payload)
        self.dropped: list[dict] = []  # payloads refused since the last evaluated round (on_bad_payload: drop)
        self.out = Path(config.out)
        self.bytes_total = 0
        self.name = self.placement.process_name
        agree(runtime, self.build_header(), "the model, data split and graph", config.comm.timeout_s, self.name)

    def make_trainers(self) -> dict[int, PeerTrainer]:
        """One trainer per hosted client; for a pooled-data method, one learner on all the data.

        The pooled learner uses the same data and seeds on every process, so each process trains
        it once and its other hosted clients copy the result: everyone holds the one model.
        """
        c = self.config
        if not self.local_clients:
            return {}
        if self.method.pooled_data:
            everything = pool([self.data.clients[p].train for p in self.clients])
            first = self.local_clients[0]
            return {first: PeerTrainer(self.models, first, everything, c.train, c.seed, c.model.precision, POOLED_STREAM)}
        return {p: PeerTrainer(self.models, p, self.data.clients[p].train, c.train, c.seed, c.model.precision)
                for p in self.local_clients}

    def is_server(self, peer: int) -> bool:
        return self.topology.server and peer == 0

    def build_header(self) -> dict[str, str]:
        """What each process built from the shared config, which must come out the same everywhere:
        the factor layout, the graph of round 0 and every client's share of the data."""
        layout = [(s.name, s.shape) for s in self.layout.a + self.layout.b + self.layout.head]
        edges = sorted(sorted((int(u), int(v))) for u, v in self.topology.graph_at(0).edges())
        shares = [(len(self.data.clients[c].train), len(self.data.clients[c].local_test)) for c in self.clients]
        return {"factor layout": f"{self.layout.numel} values, {digest(layout)}",
                "graph of round 0": f"{len(edges)} edges, {digest(edges)}",
                "data split": f"{sum(n for n, _ in shares)} training examples, {digest(shares)}"}

    # ------------------------------------------------------------------ round loop
    def run(self) -> dict:
        rank0 = self.runtime.rank == 0
        plan = self.plan_start()
        self.restore(plan)
        self.all_arrive("reading the checkpoint")  # process 0 rewrites out only once everyone has read it
        writer = outputs.prepare(self.config, self.schedule.record(), plan.first_round) if rank0 else None
        self.all_arrive("preparing the output folder")  # nobody writes into out before it is ready
        start = time.perf_counter() - plan.elapsed_s
        last: dict = {}
        try:
            for round in range(plan.first_round, self.config.rounds):
                clock = RoundClock()
                sent = self.train_and_align(round, clock)
                evaluate_now = (round + 1) % self.config.eval.every == 0 or round == self.config.rounds - 1
                before_mixing = self.gather_flats() if evaluate_now and self.method.sent_parts(round) else None
                self.exchange_and_mix(round, clock)
                self.bytes_total += sent
                record = None
                if evaluate_now:
                    record = self.evaluate_round(round, clock, before_mixing, sent, time.perf_counter() - start)
                if rank0:
                    if record:
                        writer.write(record)
                        last = record
                    elapsed = time.perf_counter() - start
                    print_progress(round, self.config.rounds, elapsed, self.bytes_total, record)
                if self.checkpoint_due(round):
                    self.save_checkpoint(round, time.perf_counter() - start)
        finally:
            if writer is not None:
                writer.close()
        if plan.first_round == self.config.rounds and rank0:
            print(f"the run in {self.out} had finished all {self.config.rounds} rounds; its adapters and summary "
                  "were written again from its last checkpoint", flush=True)
        if rank0 and not last:
            last = outputs.last_record(self.out)
        return self.finish(last, time.perf_counter() - start)

    def plan_start(self) -> StartPlan:
        """Process 0 reads ``out`` and decides how the run starts; every process follows its answer
        (errors included), so no process can see the folder change under another."""
        decision: StartPlan | str | None = None
        if self.runtime.rank == 0:
            try:
                decision = outputs.plan_start(self.config)
            except (P2PFedRotError, OSError) as exc:  # shared, so that every process stops with it
                decision = str(exc)
        if self.runtime.distributed:
            box = [decision]
            with self.collective("sharing how the run starts"):
                dist.broadcast_object_list(box, src=0)
            decision = box[0]
        if isinstance(decision, str):
            raise ConfigError(decision)
        return decision

    def train_and_align(self, round: int, clock: RoundClock) -> int:
        """Local steps then the method's pre-send hook on every hosted client; returns bytes of the round."""
        trained = self.method.trained_parts(round)
        present = self.schedule.present_at(round)
        for peer, trainer in self.trainers.items():
            if not present[peer] and not self.method.pooled_data:
                continue  # an absent peer neither trains nor mixes this round
            state = self.states[peer]
            if self.method.needs_reference:
                state.reference = state.flat.detach().clone()
            if self.reset_optimizer and round > 0:
                trainer.reset_optimizer()
            since = time.perf_counter()
            trainer.train(round, trained)
            since = clock.add("train", since)
            self.method.before_send(state, round)
            clock.add("align", since)
        if self.method.pooled_data and self.trainers:
            (learner,) = self.trainers
            for other in self.local_clients:
                self.states[other].flat.copy_(self.states[learner].flat)
        return self.round_bytes(round)

    def round_bytes(self, round: int) -> int:
        """Bytes all peers send in a round: one payload per directed route of every mixing step."""
        if not self.method.sent_parts(round):
            return 0
        element = next(iter(self.models.flats.values())).element_size()
        steps = self.schedule.steps_at(round)
        return sum(self.method.payload_numel(round, k, src) * element
                   for k, W in enumerate(steps) for src, _ in routes_of(W))

    def payload_bytes(self, round: int) -> int:
        """Size of one peer's message in the round's first step (what a gossip peer sends each neighbour)."""
        element = next(iter(self.models.flats.values())).element_size()
        sender = self.clients[0]
        return self.method.payload_numel(round, 0, sender) * element if self.method.sent_parts(round) else 0

    def exchange_and_mix(self, round: int, clock: RoundClock) -> None:
        """Apply each mixing step of the round to every hosted peer."""
        parts = self.method.sent_parts(round)
        if not parts:
            return
        local = list(self.placement.local_peers)
        for k, W in enumerate(self.schedule.steps_at(round)):
            since = time.perf_counter()
            payloads = {p: self.method.pack(self.states[p], round, k, self.layout.extract(self.states[p].flat, parts))
                        for p in local}
            mixes, dropped = collect_mix_inputs(
                self.transport, W, payloads, step=f"round {round} step {k}",
                numel_of=lambda src: self.method.payload_numel(round, k, src),
                outgoing=self.drill(payloads, round), rules=self.rules, tag=(round, k))
            self.dropped += [bad.as_record(round) for bad in dropped]
            updates = {i: self.method.combine(self.states[i], round, inputs) for i, inputs in mixes.items()}
            for i, value in updates.items():
                self.layout.insert(self.states[i].flat, parts, value)
            clock.add("exchange", since)

    def drill(self, payloads: dict[int, torch.Tensor], round: int) -> dict[int, torch.Tensor]:
        """What the hosted peers send: their payloads, one corrupted if ``comm.inject_fault`` says so."""
        fault = self.config.comm.inject_fault
        if not fault or fault["round"] != round or fault["peer"] not in payloads:
            return payloads
        bad = corrupted(payloads[fault["peer"]], fault["kind"], self.config.comm.max_norm_ratio)
        return {**payloads, fault["peer"]: bad}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_due(self, round: int) -> bool:
        every = self.config.checkpoint_every
        return round == self.config.rounds - 1 or (every > 0 and (round + 1) % every == 0)

    def save_checkpoint(self, round: int, elapsed: float) -> None:
        """Each process writes its peers; once all have, process 0 commits the checkpoint."""
        folder = checkpoint.round_folder(self.out, round)
        for peer in self.placement.local_peers:
            trainer = self.trainers.get(peer)
            checkpoint.save_peer(folder, peer, self.states[peer].flat, trainer.optimizer if trainer else None)
        if self.runtime.rank == 0:
            checkpoint.save_shared(folder, self.method.state_tensors())
        # payloads refused since the last record belong to the next one, even after a resume
        dropped = [d for process_dropped in self.gather_objects(self.dropped) for d in process_dropped]
        self.all_arrive("writing the checkpoint")
        if self.runtime.rank == 0:
            meta = {"bytes_total": self.bytes_total, "elapsed_s": elapsed, "config": self.config.to_dict(),
                    "dropped": dropped, "launch": launch_id()}
            checkpoint.commit(self.out, round, meta)

    def restore(self, plan: StartPlan) -> None:
        """Load the planned checkpoint, if any: every hosted peer's buffer and optimizer state."""
        found = plan.checkpoint
        if found is None:
            return
        for peer in self.placement.local_peers:
            self.states[peer].flat.copy_(found.peer(peer)["flat"])
        for peer, trainer in self.trainers.items():
            # the pooled learner is the same on every process; the first client's file holds it
            source = self.clients[0] if self.method.pooled_data else peer
            checkpoint.load_optimizer_tensors(trainer.optimizer, found.peer(source))
        self.method.load_state_tensors(found.shared())
        self.bytes_total = plan.bytes_total
        if self.runtime.rank == 0:  # process 0 assembles the records, so it carries the earlier drops
            self.dropped = list(found.meta.get("dropped", []))

    # ------------------------------------------------------------------ metrics
    def evaluate_round(self, round: int, clock: RoundClock, before_mixing: dict[int, torch.Tensor] | None,
                       sent: int, elapsed: float) -> dict:
        """Accuracy and loss of every peer, and on process 0 the round's record.

        ``before_mixing`` holds every peer's factors as sent this round (process 0 only; None when
        nothing was mixed), for the aggregation error.
        """
        since = time.perf_counter()
        batch, precision = self.config.eval.batch_size, self.config.model.precision
        local_results = {}
        for peer in self.local_clients:
            shared = evaluate(self.models, peer, self.data.test, batch, precision)
            own = evaluate(self.models, peer, self.data.clients[peer].local_test, batch, precision)
            local_results[peer] = (shared.accuracy, shared.loss, own.accuracy, own.loss)
        results = self.gather_objects((local_results, self.dropped))
        self.dropped = []
        flats = self.gather_flats()
        if self.runtime.rank == 0:
            errors = self.aggregation_errors(round, before_mixing, flats)
        clock.add("eval", since)
        seconds = self.max_over_processes(clock.seconds)
        if self.runtime.rank != 0:
            return {}
        per_peer: dict[int, tuple] = {}
        dropped: list[dict] = []
        for peer_results, process_dropped in results:
            per_peer.update(peer_results)
            dropped += process_dropped
        order = sorted(per_peer)
        accuracy = [per_peer[p][0] for p in order]
        mean_loss = float(np.mean([per_peer[p][1] for p in order]))
        record = {
            "round": round,
            "time_s": round_float(elapsed),
            "peers": order,
            "accuracy": accuracy,
            "loss": [per_peer[p][1] for p in order],
            "local_accuracy": [per_peer[p][2] for p in order],
            "local_loss": [per_peer[p][3] for p in order],
            "mean_accuracy": float(np.mean(accuracy)),
            "min_accuracy": float(np.min(accuracy)),
            "mean_loss": mean_loss,
            "consensus_distance": consensus_distance(self.layout, [flats[p] for p in self.clients]),
            "aggregation_error": errors[0],
            "aggregation_error_rel": errors[1],
            "bytes_sent": sent,
            "bytes_sent_total": self.bytes_total,
            "absent": np.flatnonzero(~self.schedule.present_at(round)).tolist(),
            "dropped": sorted(dropped, key=lambda d: (d["round"], d["receiver"], d["sender"])),
            "seconds": {k: round_float(v) for k, v in seconds.items()},
        }
        if self.models.task == CAUSAL_LM:
            record["perplexity"] = math.exp(min(mean_loss, 50.0))
        return record

    def aggregation_errors(self, round: int, before: dict[int, torch.Tensor] | None,
                           after: dict[int, torch.Tensor]) -> tuple[float, float]:
        """Mean (absolute, relative) gap between each mixing peer's new adapter and the exact
        W-weighted mix of the adapters its neighbours sent; 0 when nothing was mixed."""
        W = self.schedule.round_mixing(round)
        mixing = [i for i in range(self.config.peers) if not keeps_own_value(W, i)]
        if before is None or not mixing:
            return 0.0, 0.0
        peers = range(self.config.peers)
        return aggregation_error(self.layout, W, [before[p] for p in peers], [after[p] for p in peers], mixing)

    def all_arrive(self, what: str) -> None:
        """Wait for every process; on Gloo the error names the processes that did not arrive."""
        if not self.runtime.distributed:
            return
        timeout = self.config.comm.timeout_s
        with collective(what, timeout, self.name, self.runtime.heartbeat):
            if self.runtime.backend == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout), wait_all_ranks=True)
            else:
                dist.barrier()

    def gather_objects(self, obj: object) -> list:
        """Every process's ``obj`` on process 0, in process order (an empty list elsewhere)."""
        if not self.runtime.distributed:
            return [obj]
        out = [None] * self.runtime.world if self.runtime.rank == 0 else None
        with self.collective("gathering evaluation results"):
            dist.gather_object(obj, out, dst=0)
        return out or []

    def gather_flats(self) -> dict[int, torch.Tensor]:
        """Every peer's buffer on process 0 (for metrics that compare all peers)."""
        local = torch.stack([self.states[p].flat for p in self.placement.local_peers]).to(self.runtime.wire_device)
        if not self.runtime.distributed:
            chunks = [local]
        else:
            chunks = [torch.empty_like(local) for _ in range(self.runtime.world)] if self.runtime.rank == 0 else None
            with self.collective("gathering factors for the metrics"):
                dist.gather(local, chunks, dst=0)
        if self.runtime.rank != 0:
            return {}
        stacked = torch.cat(chunks)
        return {p: stacked[p] for p in range(self.config.peers)}

    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """A collective preceded by a monitored barrier: a process that died or hangs before it is
        then named (a plain gather or all-reduce cannot tell who broke it)."""
        self.all_arrive(what)
        with collective(what, self.config.comm.timeout_s, self.name, self.runtime.heartbeat):
            yield

    def max_over_processes(self, seconds: dict[str, float]) -> dict[str, float]:
        """The slowest process sets the pace, so report its time per phase."""
        if not self.runtime.distributed:
            return dict(seconds)
        values = torch.tensor(list(seconds.values()), dtype=torch.float64, device=self.runtime.wire_device)
        with self.collective("combining timings"):
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return dict(zip(seconds, values.tolist()))

    # ------------------------------------------------------------------ outputs
    def finish(self, last: dict, wall: float) -> dict:
        """Save every adapter (each process its own peers), then the summary on process 0."""
        adapters = self.out / outputs.ADAPTERS
        save_peer_adapters(self.models, [p for p in self.placement.local_peers if not self.is_server(p)], adapters)
        flats = self.gather_flats()
        if self.runtime.rank == 0:
            save_consensus_adapter(self.models, [flats[c] for c in self.clients], adapters)
            if state := self.method.state_tensors():
                checkpoint.save_tensors(adapters / "method_state.safetensors", state)
        wire = torch.tensor([self.transport.wire_bytes], dtype=torch.float64, device=self.runtime.wire_device)
        if self.runtime.distributed:
            with self.collective("summing wire bytes"):
                dist.all_reduce(wire)
        if self.runtime.rank != 0:
            return {}
        summary = {
            "peers": self.config.peers,
            "processes": self.runtime.world,
            "rounds": self.config.rounds,
            "method": self.config.method,
            "topology": self.topology.name,
            "backend": self.runtime.backend or "single-process",
            "threads": torch.get_num_threads(),
            "payload_bytes": self.payload_bytes(0),
            "bytes_sent_total": self.bytes_total,
            "wire_bytes_total": int(wire.item()),
            "final_mean_accuracy": last.get("mean_accuracy"),
            "final_min_accuracy": last.get("min_accuracy"),
            "final_consensus_distance": last.get("consensus_distance"),
            "wall_time_s": round_float(wall),
        }
        atomic_write_json(self.out / outputs.SUMMARY, summary)
        return summary


def round_float(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x


def print_progress(round: int, rounds: int, elapsed: float, bytes_total: int, record: dict | None) -> None:
    """One line per round; accuracy and consensus only on rounds that were evaluated."""
    scores = "(not evaluated this round)"
    if record is not None:
        scores = (f"acc mean {record['mean_accuracy']:.3f} min {record['min_accuracy']:.3f} | "
                  f"consensus {record['consensus_distance']:.2e}")
    print(f"round {round + 1:>3}/{rounds} | {scores} | {elapsed:.1f} s | {bytes_total / 1e6:.2f} MB sent", flush=True)
