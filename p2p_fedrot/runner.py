"""The round loop: train -> align -> exchange -> mix -> evaluate -> log -> checkpoint.

Every process runs this loop for the peers it hosts. All decisions (graph of the round, mixing
weights, which parts train or travel) are computed identically on every process from the config
and the seed, so processes only exchange factors, never control messages.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint, methods
from .adapters import save_consensus_adapter, save_peer_adapters
from .config import RunConfig, save_config
from .data import build_data, pool
from .factors import FactorLayout
from .gossip import collect_mix_inputs, keeps_own_value, routes_of
from .io import JsonlWriter, atomic_write_json, atomic_write_text, read_jsonl, to_json
from .metrics import aggregation_error, consensus_distance
from .mixing import compose, mixing_matrix, server_mixing_steps, spectral_gap
from .model import CAUSAL_LM, build_peer_models, load_tokenizer, task_of
from .topology import Topology, build_topology, topology_stats
from .training import PeerTrainer, evaluate
from .transport import Placement, Runtime, Transport, collective, init_runtime


POOLED_STREAM = 2**32 - 1  # seed key of the pooled learner's batches (never a peer id)
SCHEDULE_WINDOW = 64  # rounds averaged to plan with a time-varying graph's spectral gap
ADAPTERS = "adapters"  # folder of out with every peer's adapter in peft format
PER_PROCESS_KEYS = ("out", "threads", "comm")  # config keys that may differ between the processes of a launch


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
        return Experiment(config, runtime).run()
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


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
        self.static_steps = self.mixing_steps(0) if self.topology.static else None
        context = methods.MethodContext(self.layout, self.planning_gap(), self.topology.server, self.models.model)
        self.method = methods.make_method(config.method, config.method_args, context)
        self.states = {p: methods.PeerState(p, self.models.flats[p]) for p in local}
        self.local_clients = [p for p in local if not self.is_server(p)]
        self.trainers = self.make_trainers()
        rule = config.train.optimizer_state
        self.reset_optimizer = rule == "reset" or (rule == "method" and self.method.resets_optimizer)
        self.transport = Transport(self.placement, runtime.device, config.comm.timeout_s, self.fingerprint(),
                                   runtime.wire_device)
        self.out = Path(config.out)
        self.bytes_total = 0

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

    def fingerprint(self) -> int:
        """Hash of everything that must agree between processes: the whole config but the keys
        that may differ per process, and the factor layout."""
        shared = {k: v for k, v in self.config.to_dict().items() if k not in PER_PROCESS_KEYS}
        shared["layout_numel"] = self.layout.numel
        digest = hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).digest()
        return int.from_bytes(digest[:8], "little")

    def steps_at(self, round: int) -> list[np.ndarray]:
        """The round's mixing steps: those computed once for a static graph, else drawn for the round."""
        return self.static_steps or self.mixing_steps(round)

    def mixing_steps(self, round: int) -> list[np.ndarray]:
        """The mixing matrices of a round: one gossip step, or the server's up and down steps."""
        if self.topology.server:
            return server_mixing_steps([len(self.data.clients[c].train) for c in self.clients])
        return [mixing_matrix(self.topology.graph_at(round), self.config.mixing)]

    def planning_gap(self) -> float:
        """The spectral gap methods plan with: one round's, or for a time-varying graph that of its
        average round over a window (a single random matching is disconnected; matchings mix)."""
        if self.topology.static:
            return spectral_gap(self.round_mixing(0))
        return spectral_gap(np.mean([self.round_mixing(r) for r in range(SCHEDULE_WINDOW)], axis=0))

    def round_mixing(self, round: int) -> np.ndarray:
        """One whole round's mixing: the product of its steps (the server's is exact averaging)."""
        return compose(self.steps_at(round))

    # ------------------------------------------------------------------ round loop
    def run(self) -> dict:
        rank0 = self.runtime.rank == 0
        first, earlier_seconds = self.restore() if self.config.resume else (0, 0.0)
        writer = self.start_outputs(first) if rank0 else None
        self.all_arrive("preparing the output folder")  # nobody writes into out before it is ready
        start = time.perf_counter() - earlier_seconds
        last: dict = {}
        try:
            for round in range(first, self.config.rounds):
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
        summary = self.finish(last, time.perf_counter() - start)
        return summary

    def train_and_align(self, round: int, clock: RoundClock) -> int:
        """Local steps then the method's pre-send hook on every hosted client; returns bytes of the round."""
        trained = self.method.trained_parts(round)
        for peer, trainer in self.trainers.items():
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
        steps = self.steps_at(round)
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
        for k, W in enumerate(self.steps_at(round)):
            since = time.perf_counter()
            payloads = {p: self.method.pack(self.states[p], round, k, self.layout.extract(self.states[p].flat, parts))
                        for p in local}
            mixes = collect_mix_inputs(self.transport, W, payloads, step=f"round {round} step {k}",
                                       numel_of=lambda src: self.method.payload_numel(round, k, src))
            updates = {i: self.method.combine(self.states[i], round, inputs) for i, inputs in mixes.items()}
            for i, value in updates.items():
                self.layout.insert(self.states[i].flat, parts, value)
            clock.add("exchange", since)

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
        self.all_arrive("writing the checkpoint")
        if self.runtime.rank == 0:
            meta = {"bytes_total": self.bytes_total, "elapsed_s": elapsed, "config": self.config.to_dict()}
            checkpoint.commit(self.out, round, meta)

    def restore(self) -> tuple[int, float]:
        """Load the checkpoint in ``out``; returns the first round to run and the seconds already spent."""
        found = checkpoint.find(self.out, self.config.to_dict())
        for peer in self.placement.local_peers:
            self.states[peer].flat.copy_(found.peer(peer)["flat"])
        for peer, trainer in self.trainers.items():
            # the pooled learner is the same on every process; the first client's file holds it
            source = self.clients[0] if self.method.pooled_data else peer
            checkpoint.load_optimizer_tensors(trainer.optimizer, found.peer(source))
        self.method.load_state_tensors(found.shared())
        self.bytes_total = found.meta["bytes_total"]
        return found.round + 1, found.meta["elapsed_s"]

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
        results = self.gather_objects(local_results)
        flats = self.gather_flats()
        if self.runtime.rank == 0:
            errors = self.aggregation_errors(round, before_mixing, flats)
        clock.add("eval", since)
        seconds = self.max_over_processes(clock.seconds)
        if self.runtime.rank != 0:
            return {}
        per_peer: dict[int, tuple] = {}
        for peer_results in results:
            per_peer.update(peer_results)
        order = sorted(per_peer)
        accuracy = [per_peer[p][0] for p in order]
        self.last_flats = flats
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
            "seconds": {k: round_float(v) for k, v in seconds.items()},
        }
        if self.models.task == CAUSAL_LM:
            record["perplexity"] = math.exp(min(mean_loss, 50.0))
        return record

    def aggregation_errors(self, round: int, before: dict[int, torch.Tensor] | None,
                           after: dict[int, torch.Tensor]) -> tuple[float, float]:
        """Mean (absolute, relative) gap between each mixing peer's new adapter and the exact
        W-weighted mix of the adapters its neighbours sent; 0 when nothing was mixed."""
        W = self.round_mixing(round)
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
        with collective(what, timeout):
            if self.runtime.backend == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout), wait_all_ranks=True)
            else:
                dist.barrier()

    def gather_objects(self, obj) -> list:
        if not self.runtime.distributed:
            return [obj]
        self.all_arrive("evaluating")
        out = [None] * self.runtime.world if self.runtime.rank == 0 else None
        with collective("gathering evaluation results", self.config.comm.timeout_s):
            dist.gather_object(obj, out, dst=0)
        return out or []

    def gather_flats(self) -> dict[int, torch.Tensor]:
        """Every peer's buffer on process 0 (for metrics that compare all peers)."""
        local = torch.stack([self.states[p].flat for p in self.placement.local_peers]).to(self.runtime.wire_device)
        if not self.runtime.distributed:
            chunks = [local]
        else:
            chunks = [torch.empty_like(local) for _ in range(self.runtime.world)] if self.runtime.rank == 0 else None
            with collective("gathering factors for the metrics", self.config.comm.timeout_s):
                dist.gather(local, chunks, dst=0)
        if self.runtime.rank != 0:
            return {}
        stacked = torch.cat(chunks)
        return {p: stacked[p] for p in range(self.config.peers)}

    def max_over_processes(self, seconds: dict[str, float]) -> dict[str, float]:
        """The slowest process sets the pace, so report its time per phase."""
        if not self.runtime.distributed:
            return dict(seconds)
        values = torch.tensor(list(seconds.values()), dtype=torch.float64, device=self.runtime.wire_device)
        with collective("combining timings", self.config.comm.timeout_s):
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return dict(zip(seconds, values.tolist()))

    # ------------------------------------------------------------------ outputs
    def start_outputs(self, first: int) -> JsonlWriter:
        """Fresh outputs, or, when resuming at round ``first``, the metrics of the rounds before it."""
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.out / "config.yaml")
        atomic_write_json(self.out / "topology.json", self.topology_record())
        metrics = self.out / "metrics.jsonl"
        if first == 0:  # a fresh run replaces an earlier run's outputs, so that none outlive it
            for folder in (checkpoint.folder_of(self.out), self.out / ADAPTERS):
                shutil.rmtree(folder, ignore_errors=True)
            return JsonlWriter(metrics)
        kept = [record for record in read_jsonl(metrics) if record["round"] < first] if metrics.is_file() else []
        atomic_write_text(metrics, "".join(to_json(record) + "\n" for record in kept))
        return JsonlWriter(metrics, append=True)

    def topology_record(self) -> dict:
        """Graph, mixing steps and spectral numbers of round 0 (all rounds, for static graphs).

        The spectral gap is that of one whole round, the product of its mixing steps: the
        server's up-then-down exchange averages exactly, so its gap is 1.
        """
        graph = self.topology.graph_at(0)
        steps = self.steps_at(0)
        round_W = compose(steps)
        return {
            "name": self.topology.name,
            "peers": self.topology.peers,
            "server": self.topology.server,
            "static": self.topology.static,
            "params": self.topology.params,
            "mixing": "server (sample-weighted average)" if self.topology.server else self.config.mixing,
            "edges": sorted([sorted((int(u), int(v))) for u, v in graph.edges()]),
            "W": [W.tolist() for W in steps] if len(steps) > 1 else steps[0].tolist(),
            "spectral_gap": spectral_gap(round_W),
            "stats": topology_stats(graph, round_W),
            "note": "" if self.topology.static else "time-varying: edges and W are those of round 0",
        }

    def finish(self, last: dict, wall: float) -> dict:
        """Save every adapter (each process its own peers), then the summary on process 0."""
        adapters = self.out / ADAPTERS
        save_peer_adapters(self.models, [p for p in self.placement.local_peers if not self.is_server(p)], adapters)
        if self.runtime.rank == 0:
            save_consensus_adapter(self.models, [self.last_flats[c] for c in self.clients], adapters)
            if state := self.method.state_tensors():
                checkpoint.save_tensors(adapters / "method_state.safetensors", state)
        wire = torch.tensor([self.transport.wire_bytes], dtype=torch.float64, device=self.runtime.wire_device)
        if self.runtime.distributed:
            with collective("summing wire bytes", self.config.comm.timeout_s):
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
        atomic_write_json(self.out / "summary.json", summary)
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
