"""The round loop: train -> align -> (exchange -> mix [-> measure]) per mixing step -> evaluate -> record
-> checkpoint.

Every process runs this loop for the peers it hosts. All decisions (graph of the round, mixing
weights, which parts train or travel) are computed identically on every process from the config
and the seed, so processes only exchange factors and metric sums, never control messages.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import methods
from ..comm.auth import authenticate
from ..comm.collectives import ProcessGroup
from ..comm.faults import TAMPER
from ..comm.runtime import Runtime, agree, init_runtime, launch_id, plain_process_name, usable_cores
from ..comm.transport import Placement, Transport
from ..config import RunConfig, dotted
from ..data.federated import build_data
from ..errors import ConfigError, P2PFedRotError
from ..graph.schedule import MixingSchedule
from ..graph.topologies import build_topology, edge_pairs
from ..io import atomic_write_json
from ..methods.base import RotationLog
from ..peers.adapters import save_consensus_adapter
from ..peers.models import CAUSAL_LM, build_bank, load_tokenizer, task_of
from ..peers.training import peers_per_forward
from ..provenance import code_version
from . import checkpoint, outputs
from .adversary import Adversary, check_adversary, poison
from .diagnostics import round_metrics
from .exchange_step import Mixer, MixOutcome
from .hosting import HostedPeers
from .outputs import StartPlan
from .records import RoundClock, print_progress, round_float, round_record
from .robust_mixing import robust_rule, rule_record

PER_PROCESS_KEYS = ("out", "threads", "comm.timeout_s")  # settings that may differ between a launch's processes
VERSIONED = ("torch", "transformers", "peft", "p2p_fedrot")  # packages whose versions every process must share


def run(config: RunConfig) -> dict:
    """Run a whole experiment in this process (one of P under torchrun); returns the summary."""
    runtime = init_runtime(config.comm.backend, config.comm.timeout_s)
    try:
        return run_in(runtime, config)
    finally:
        if runtime.heartbeat is not None:
            runtime.heartbeat.stop()
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


def run_in(runtime: Runtime, config: RunConfig) -> dict:
    """Run one experiment on a launch whose process group is already formed: a launch that runs
    several experiments in turn (the run matrix) joins the group once."""
    torch.set_num_threads(config.threads or max(1, usable_cores() // runtime.local_world))
    # before any work: a process without the launch secret, or launched with other settings, must
    # stop everyone at once; the secret first, so that nothing is unpickled from an outsider
    name = Placement(config.peers, runtime.world, runtime.rank).process_name \
        if config.peers % runtime.world == 0 else plain_process_name
    runtime = authenticate(runtime, config.comm.timeout_s, name)
    agree(runtime, startup_header(config), "the configuration and package versions", config.comm.timeout_s, name)
    check_drill(config, runtime)
    return Experiment(config, runtime).run()


def check_drill(config: RunConfig, runtime: Runtime) -> None:
    """The tamper drill alters frames between processes: with one process it would never fire."""
    fault = config.comm.inject_fault
    if fault and fault["kind"] == TAMPER and not runtime.distributed:
        raise ConfigError("comm.inject_fault kind tamper alters frames between processes, and a single process sends "
                          "none: launch two or more (torchrun --nproc_per_node=2)")


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
    """One run on one process: the hosted peers, the mixing schedule and the outputs."""

    def __init__(self, config: RunConfig, runtime: Runtime) -> None:
        self.config, self.runtime = config, runtime
        self.placement = Placement(config.peers, runtime.world, runtime.rank)
        self.group = ProcessGroup(runtime, config.comm.timeout_s, self.placement.process_name)
        self.topology = build_topology(config.topology, config.peers, config.seed, config.allow_disconnected)
        self.clients = [p for p in range(config.peers) if not (self.topology.server and p == 0)]
        causal_lm = task_of(config.model) == CAUSAL_LM
        check_adversary(config.adversary, self.clients, self.topology.server, config.method, causal_lm)
        rule = robust_rule(config.robust, config.method, self.topology.server)
        # honest metrics leave the adversary's peers out
        self.honest = frozenset(self.clients) - frozenset(config.adversary.peers)
        tokenizer = load_tokenizer(config.model)
        self.data = build_data(config.data, self.clients, config.seed, tokenizer, config.model.max_length,
                               causal_lm)
        poison(self.data, config.adversary)
        self.bank = build_bank(config.model, list(self.placement.local_peers), self.data.input_dim,
                               self.data.num_classes, config.seed, runtime.device,
                               methods.trains_dense_deltas(config.method))
        self.layout = self.bank.layout
        self.adversary = Adversary(config.adversary, config.seed, self.layout) if config.adversary.peers else None
        self.schedule = MixingSchedule(self.topology, config.mixing, [len(self.data.clients[c].train) for c in self.clients],
                                       config.seed, config.participation)
        context = methods.MethodContext(self.layout, self.schedule.planning_gap, self.topology.server, self.bank.model)
        self.method = methods.make_method(config.method, config.method_args, context)
        if self.method.changes_base_weights and config.participation < 1:
            raise ConfigError(f"method {config.method} folds every round's residual into the base weights that all "
                              "peers of a process share, so every client must take part in every round; set "
                              "participation: 1")
        self.per_forward = peers_per_forward(config.train.batch_peers, self.bank, self.data.test, config.train.batch_size)
        self.hosted = HostedPeers(config, self.bank, self.method, self.data, self.clients, self.per_forward)
        transport = Transport(self.placement, runtime.device, config.comm.timeout_s, runtime.wire_device,
                              runtime.frame_key)
        probe = Transport(self.placement, runtime.device, config.comm.timeout_s, runtime.wire_device,
                          runtime.frame_key)
        self.mixer = Mixer(self.method, self.schedule, self.layout, transport, probe, config.comm,
                           config.train.warmup_rounds, self.adversary, rule)
        self.out = Path(config.out)
        self.bytes_total = 0
        self.wire_bytes_before = 0  # sent over the wire by all processes before the checkpoint resumed from
        agree(runtime, self.build_header(), "the model, data split and graph", config.comm.timeout_s,
              self.placement.process_name)

    def build_header(self) -> dict[str, str]:
        """What each process built from the shared config, which must come out the same everywhere:
        the factor layout, the graph of round 0 and every client's share of the data."""
        layout = [(s.name, s.shape) for s in self.layout.specs]
        edges = edge_pairs(self.topology.graph_at(0))
        shares = [(len(self.data.clients[c].train), len(self.data.clients[c].local_test)) for c in self.clients]
        return {"factor layout": f"{self.layout.numel} values, {digest(layout)}",
                "graph of round 0": f"{len(edges)} edges, {digest(edges)}",
                "data split": f"{sum(n for n, _ in shares)} training examples, {digest(shares)}"}

    # ------------------------------------------------------------------ round loop
    def run(self) -> dict:
        rank0 = self.runtime.rank == 0
        plan = self.plan_start()
        unreported = self.restore(plan)  # payloads refused since the last record (on_bad_payload: drop)
        self.group.arrive("reading the checkpoint")  # process 0 rewrites out only once everyone has read it
        writer = outputs.prepare(self.config, self.schedule.record(), plan.first_round) if rank0 else None
        tensorboard = rank0 and self.config.log.tensorboard
        board = outputs.TensorBoardWriter(self.out, plan.first_round) if tensorboard else None
        self.group.arrive("preparing the output folder")  # nobody writes into out before it is ready
        start = time.perf_counter() - plan.elapsed_s
        states, last = self.hosted.states, {}
        try:
            for round in range(plan.first_round, self.config.rounds):
                clock, evaluated = RoundClock(), self.evaluated(round)
                with clock.phase("train"):
                    trained = self.hosted.train(round, self.schedule.present_at(round))
                with clock.phase("align"):
                    aligned = self.hosted.align(round, trained)
                mixed = MixOutcome()
                for step in self.mixer.steps(round):  # the combine counts as exchange, the error metric as eval
                    with clock.phase("exchange"):
                        arrived = self.mixer.exchange(step, states)
                    with clock.phase("eval"):  # what the error metric compares with, before the mix overwrites it
                        kept = self.mixer.keep_sent(arrived, states) if evaluated else None
                    with clock.phase("exchange"):
                        mixed.add(self.mixer.combine(arrived, states))
                    if evaluated:
                        with clock.phase("eval"):
                            mixed.add(self.mixer.measure(kept, states))
                self.hosted.follow_rotations(mixed.rotated)
                self.method.settle(round, mixed.refused, partial(self.group.reduce, what="settling the round's mixing"))
                sent = self.mixer.round_bytes(round, self.bank.flats.element_size())
                self.bytes_total += sent
                unreported += mixed.dropped
                record = None
                if evaluated:
                    elapsed = time.perf_counter() - start
                    with clock.phase("eval"):
                        scores = self.evaluate(round, mixed, aligned + mixed.rotations, unreported)
                    record, unreported = self.record(round, scores, sent, clock, elapsed), []
                    if record:  # process 0
                        writer.write(record)
                        if board is not None:
                            board.write(record)
                        last = record
                if rank0:
                    print_progress(round, self.config.rounds, time.perf_counter() - start, self.bytes_total, record)
                if self.checkpoint_due(round):
                    self.save_checkpoint(round, time.perf_counter() - start, unreported)
        finally:
            if writer is not None:
                writer.close()
            if board is not None:
                board.close()
        if plan.first_round == self.config.rounds and rank0:
            print(f"the run in {self.out} had finished all {self.config.rounds} rounds; its adapters and summary "
                  "were written again from its last checkpoint", flush=True)
        if rank0 and not last:
            last = outputs.last_record(self.out)
        return self.finish(last, time.perf_counter() - start)

    def evaluated(self, round: int) -> bool:
        return (round + 1) % self.config.eval.every == 0 or round == self.config.rounds - 1

    def plan_start(self) -> StartPlan:
        """Process 0 reads ``out`` and decides how the run starts; every process follows its answer
        (errors included), so no process can see the folder change under another."""
        decision: StartPlan | str | None = None
        if self.runtime.rank == 0:
            try:
                decision = outputs.plan_start(self.config)
            except (P2PFedRotError, OSError) as exc:  # shared, so that every process stops with it
                decision = str(exc)
        decision = self.group.broadcast_object(decision, "sharing how the run starts")
        if isinstance(decision, str):
            raise ConfigError(decision)
        return decision

    # ------------------------------------------------------------------ metrics
    def evaluate(self, round: int, mixed: MixOutcome, rotations: RotationLog,
                 unreported: list[dict]) -> tuple[list, dict[str, float | None]]:
        """Every hosted client's scores gathered with every process's refused payloads (``unreported``),
        and the round's metrics summed exactly over processes (``rotations``: what this process's method
        applied in the round's align and mix phases)."""
        results = self.group.gather_objects((self.hosted.evaluate(round), unreported), "gathering evaluation results")
        metrics = round_metrics(self.layout, self.hosted.client_rows(self.honest), len(self.honest), mixed,
                                rotations, self.group.reduce)
        return results, metrics

    def record(self, round: int, scores: tuple[list, dict[str, float | None]], sent: int, clock: RoundClock,
               elapsed: float) -> dict:
        """The round's record on process 0 (an empty dict elsewhere), with each phase's slowest process."""
        seconds = self.group.max_seconds(clock.seconds)
        if self.runtime.rank != 0:
            return {}
        results, metrics = scores
        per_peer = {p: process_scores for process_results, _ in results for p, process_scores in process_results.items()}
        dropped = [d for _, process_dropped in results for d in process_dropped]
        absent = np.flatnonzero(~self.schedule.present_at(round)).tolist()
        return round_record(round, elapsed, per_peer, metrics, sent, self.bytes_total, absent, dropped, seconds,
                            self.bank.task == CAUSAL_LM, self.config.adversary.peers)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_due(self, round: int) -> bool:
        every = self.config.checkpoint_every
        return round == self.config.rounds - 1 or (every > 0 and (round + 1) % every == 0)

    def save_checkpoint(self, round: int, elapsed: float, unreported: list[dict]) -> None:
        """Each process writes its peers; once all have, process 0 commits the checkpoint, with the
        payloads refused since the last record (``unreported``)."""
        folder = checkpoint.round_folder(self.out, round)
        self.hosted.save(folder)
        if self.runtime.rank == 0:
            checkpoint.save_shared(folder, self.method.state_tensors())
        # payloads refused since the last record belong to the next one, even after a resume
        dropped = [d for process_dropped in self.group.gather_objects(unreported, "gathering refused payloads")
                   for d in process_dropped]
        wire_bytes = self.wire_bytes_total()
        self.group.arrive("writing the checkpoint")
        if self.runtime.rank == 0:
            meta = {"bytes_total": self.bytes_total, "wire_bytes_total": wire_bytes, "elapsed_s": elapsed,
                    "config": self.config.to_dict(), "dropped": dropped, "launch": launch_id()}
            checkpoint.commit(self.out, round, meta)

    def restore(self, plan: StartPlan) -> list[dict]:
        """Load the planned checkpoint, if any: every hosted peer's buffer and optimizer state. Returns
        the payloads refused since the checkpoint's last record, on process 0, which assembles the records."""
        found = plan.checkpoint
        if found is None:
            return []
        self.hosted.restore(found)
        self.method.load_state_tensors(found.shared())
        self.bytes_total = plan.bytes_total
        self.wire_bytes_before = plan.wire_bytes_total
        return list(found.meta.get("dropped", [])) if self.runtime.rank == 0 else []

    def wire_bytes_total(self) -> int:
        """Bytes all processes sent over the wire in the whole run, the part before a resume included
        (every process must call it: it sums over them)."""
        wire = torch.tensor([float(self.mixer.transport.wire_bytes)], dtype=torch.float64)
        self.group.reduce(wire, "sum", "summing wire bytes")
        return self.wire_bytes_before + int(wire.item())

    # ------------------------------------------------------------------ outputs
    def finish(self, last: dict, wall: float) -> dict:
        """Save every adapter (each process its own peers), then the summary on process 0."""
        adapters = self.out / outputs.ADAPTERS
        labels = self.data.class_names if self.bank.task != CAUSAL_LM else []
        self.hosted.save_adapters(adapters, labels)
        rows = self.hosted.client_rows(self.honest)
        consensus = self.method.consensus(rows, len(self.honest), self.group.reduce)
        wire_bytes = self.wire_bytes_total()
        if self.runtime.rank != 0:
            return {}
        save_consensus_adapter(self.bank, consensus.float(), adapters, labels)
        if state := self.method.state_tensors():
            checkpoint.save_tensors(adapters / "method_state.safetensors", state)
        summary = {
            "peers": self.config.peers,
            "processes": self.runtime.world,
            "rounds": self.config.rounds,
            "method": self.config.method,
            **({"adversary": self.adversary.record()} if self.adversary is not None else {}),
            **({"robust": rule_record(self.config.robust)} if self.mixer.rule is not None else {}),
            "topology": self.topology.name,
            "backend": self.runtime.backend or "single-process",
            "threads": torch.get_num_threads(),
            "peers_per_forward": self.per_forward,
            "payload_bytes": self.mixer.payload_bytes(self.config.train.warmup_rounds, self.clients[0],
                                                      self.bank.flats.element_size()),
            "peer_state_bytes": self.hosted.peer_state_bytes(),
            "bytes_sent_total": self.bytes_total,
            "wire_bytes_total": wire_bytes,
            "final_mean_accuracy": last.get("mean_accuracy"),
            "final_min_accuracy": last.get("min_accuracy"),
            "final_consensus_distance": last.get("consensus_distance"),
            "wall_time_s": round_float(wall),
            "code": code_version(),
        }
        atomic_write_json(self.out / outputs.SUMMARY, summary)
        return summary
