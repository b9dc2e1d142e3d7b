"""Which SGLang server a data-parallel rank uses: rollout replicas of `rollout.tensor_model_parallel_size` GPUs.

On a node with G GPUs and TP = t, ranks with local ranks 0..t-1 share replica 0 (its server runs on their GPUs,
started by the first of them, `--base-gpu-id` = that rank's GPU), t..2t-1 replica 1, and so on: G / t replicas
per node. Every rank sends its own requests to its replica over HTTP (verl's server mode: no gather to rank 0).
The leader of a replica alone pushes weights and puts the server to sleep; the others take part in the weight
gathers (collectives) and wait at a barrier, so a server never sleeps while one of its ranks still generates.
With rollout.server_url every rank uses that one server (standalone) and rank 0 leads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from hybridrl import HybridRLError


@dataclass(frozen=True)
class Replica:
    index: int             # replica number over the whole job
    leader: bool           # this rank starts the server, pushes weights, sleeps and wakes it
    leader_rank: int       # global rank of the replica's leader
    base_gpu_id: int | None  # first GPU of the server on this node (None on CPU)


def place(rank: int, world: int, tp: int, attached: bool, gpu_index: int | None) -> Replica:
    """This rank's replica; `attached`: one server given by rollout.server_url serves every rank."""
    if world == 1:
        return Replica(0, True, 0, gpu_index)
    if attached:
        return Replica(0, rank == 0, 0, None)
    local = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if tp > local_world or local_world % tp:
        raise HybridRLError(
            f"rollout.tensor_model_parallel_size={tp} must divide the ranks per node ({local_world}): a rollout "
            "replica's GPUs are on one node (tensor parallelism across nodes is not implemented yet); lower it, "
            "or start the server yourself and set rollout.server_url")
    node_first = rank - local
    return Replica(index=rank // tp, leader=local % tp == 0, leader_rank=node_first + (local // tp) * tp,
                   base_gpu_id=None if gpu_index is None else gpu_index)
