"""The peers one process hosts: their bank rows, their method state, their trainer and their data."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import torch

from .. import methods
from ..config import RunConfig
from ..data.federated import FederatedData, pool
from ..methods.base import RotationLog
from ..peers.adapters import save_peer_adapters
from ..peers.bank import PeerBank
from ..peers.training import BankTrainer, EvalResult, evaluate
from . import checkpoint
from .records import announce_phase

POOLED_STREAM = 2**32 - 1  # seed key of the pooled learner's batches (never a peer id)


class HostedPeers:
    """Local training, evaluation and saving of the hosted peers; the method decides what they do.

    For a pooled-data method one learner trains on all the data with the same seeds on every
    process, so each process trains it once and its other hosted clients copy the result.
    """

    def __init__(self, config: RunConfig, bank: PeerBank, method: methods.Method, data: FederatedData,
                 clients: list[int], group: int) -> None:
        self.config, self.bank, self.method, self.data, self.group = config, bank, method, data, group
        self.clients = [p for p in bank.peers if p in set(clients)]  # hosted clients (not the server's hub)
        self.first_client = clients[0]  # of the whole run: where the pooled learner's optimizer state is kept
        self.states = {p: methods.PeerState(p, bank.flat(p)) for p in bank.peers}
        c = config
        if method.pooled_data and self.clients:
            everything = pool([data.clients[p].train for p in clients])
            datasets, streams = {self.clients[0]: everything}, {self.clients[0]: POOLED_STREAM}
        else:
            datasets, streams = {p: data.clients[p].train for p in self.clients}, None
        self.trainer = BankTrainer(bank, datasets, c.train, c.seed, c.model.precision, group, streams, method.galore)
        for p in self.trainer.peers:
            self.states[p].moments = self.trainer.second_moments(p)
        rule = c.train.optimizer_state
        self.reset_optimizer = rule == "reset" or (rule == "method" and method.resets_optimizer)

    def train(self, round: int, present: np.ndarray) -> list[int]:
        """Local steps on every hosted client present this round (the pooled learner: every round),
        from a reference copy of its buffer where the method asks for one and, under the optimizer-state
        reset policy, fresh optimizer state. Returns the peers that trained."""
        since = time.perf_counter()
        method = self.method
        training = [p for p in self.trainer.peers if present[p] or method.pooled_data]
        if method.needs_reference:
            for p in training:
                self.states[p].reference = self.states[p].flat.detach().clone()
        if self.reset_optimizer and round > 0:
            self.trainer.reset_optimizers(training)
        self.trainer.train(round, training, method.trained_parts(round))
        announce_phase(round, self.config.rounds, f"process 0 trained {_peers(len(training))}",
                       time.perf_counter() - since)
        return training

    def align(self, round: int, trained: list[int]) -> RotationLog:
        """The method's pre-send hook on each peer that trained, its optimizer moments following the
        rotations the hook applied; the pooled learner's copies then take its result. Returns the log
        of the rotations applied."""
        log = RotationLog()
        for p in trained:
            aligned = self.method.before_send(self.states[p], round)
            if aligned.rotations is not None:
                self.trainer.rotate_moments(p, aligned.rotations)
            log = log + aligned.log
        if self.method.pooled_data and trained:
            for other in self.clients:
                self.states[other].flat.copy_(self.states[trained[0]].flat)
        return log

    def follow_rotations(self, rotated: list[tuple[int, list[torch.Tensor]]]) -> None:
        """Turn the optimizer moments of hosted peers whose own factors mixing rotated (see
        MixOutcome.rotated), in the order applied, so that their next steps read moments in the new
        frame; a peer that does not train (the server's hub) has none."""
        training = set(self.trainer.peers)
        for peer, rotations in rotated:
            if peer in training:
                self.trainer.rotate_moments(peer, rotations)

    def evaluate(self, round: int) -> dict[int, tuple[float, float, float, float]]:
        """(accuracy, loss) on the shared test set and on its own test split, per hosted client.

        Clients holding the same bits (server mode, a complete graph, the pooled learner) share one
        pass over the shared test set: the same numbers as one pass each, at the cost of one."""
        since = time.perf_counter()
        batch, precision = self.config.eval.batch_size, self.config.model.precision
        copies = identical_rows(self.bank, self.clients)
        scores = evaluate(self.bank, {same[0]: self.data.test for same in copies}, batch, precision, self.group)
        shared = {p: scores[same[0]] for same in copies for p in same}
        own = evaluate(self.bank, {p: self.data.clients[p].local_test for p in self.clients}, batch, precision,
                       self.group)
        announce_phase(round, self.config.rounds, f"process 0 evaluated {_peers(len(self.clients))}",
                       time.perf_counter() - since)
        return {p: _pair(shared[p]) + _pair(own[p]) for p in self.clients}

    def save(self, folder: Path) -> None:
        """Every hosted peer's buffer and optimizer state into a checkpoint folder."""
        for peer in self.bank.peers:
            state = self.trainer.optimizer_state(peer) if self.keeps_optimizer_state(peer) else {}
            checkpoint.save_peer(folder, peer, self.states[peer].flat, state)

    def keeps_optimizer_state(self, peer: int) -> bool:
        """Whether ``peer``'s checkpoint file holds an optimizer state: every training peer's, but the
        pooled learner's only once, under the first client, so that the files are the same bits
        whichever process trains a copy of it."""
        return peer in self.trainer.peers and (not self.method.pooled_data or peer == self.first_client)

    def restore(self, found: checkpoint.Checkpoint) -> None:
        """Load buffers and optimizer states (the pooled learner's from the first client's file)."""
        for peer in self.bank.peers:
            self.states[peer].flat.copy_(found.peer(peer)["flat"])
        for peer in self.trainer.peers:
            source = self.first_client if self.method.pooled_data else peer
            self.trainer.load_optimizer_state(peer, found.peer(source), str(checkpoint.peer_file(found.folder, source)))

    def peer_state_bytes(self) -> int:
        """What one training peer keeps beside the shared base model: its buffer and its optimizer state."""
        return self.bank.layout.numel * self.bank.flats.element_size() + self.trainer.optimizers.state_bytes()

    def save_adapters(self, folder: Path, labels: Sequence[str] = ()) -> None:
        save_peer_adapters(self.bank, self.clients, folder, labels)

    def client_rows(self, among: Collection[int] | None = None) -> torch.Tensor:
        """The hosted clients' buffers as rows (clients x numel): all of them, or those ``among`` some peers."""
        clients = self.clients if among is None else [p for p in self.clients if p in among]
        return self.bank.rows(clients) if clients else self.bank.flats[:0]


def identical_rows(bank: PeerBank, peers: list[int]) -> list[list[int]]:
    """``peers`` grouped by bitwise-equal buffers, in order of first appearance. A hash of each row's
    bytes proposes the group and torch.equal confirms it, so a collision never merges two adapters."""
    by_hash: dict[bytes, list[list[int]]] = {}
    groups: list[list[int]] = []
    for peer in peers:
        row = bank.flat(peer).detach()
        key = hashlib.blake2b(row.cpu().contiguous().view(torch.uint8).numpy(), digest_size=16).digest()
        candidates = by_hash.setdefault(key, [])
        same = next((group for group in candidates if torch.equal(bank.flat(group[0]), row)), None)
        if same is None:
            same = []
            candidates.append(same)
            groups.append(same)
        same.append(peer)
    return groups


def _peers(count: int) -> str:
    return f"{count} peer" if count == 1 else f"{count} peers"


def _pair(result: EvalResult) -> tuple[float, float]:
    return result.accuracy, result.loss
