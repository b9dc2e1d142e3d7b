"""Start the ranks of a multi-node run through Ray: the one module of hybridrl that imports `ray`.

    ray start --head --port=6379 --node-ip-address=A          # node A (the head; runs the `hybridrl train` driver)
    ray start --address=A:6379                                # every other node
    hybridrl train trainer.nnodes=2 trainer.n_gpus_per_node=8 ...   # on node A: 16 ranks, 8 per node

`launch_on_ray(cfg)` joins the running cluster (`RAY_ADDRESS`, default "auto": the one `ray start` made on this
machine), checks it has the resources, reserves them with a placement group (one bundle per node on GPU, one per
rank on CPU), starts one actor per rank, tells each its rank variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR = rank 0's node IP, MASTER_PORT = a port free there) and has it run
`hybridrl.launch.rank_main`, the same function torch's launcher runs on one node. Rank 0's dict is the result.
A rank that fails stops the others; its one-line message becomes this launcher's HybridRLError.

HYBRIDRL_RAY_LOCAL=1 starts a private Ray cluster inside this process instead (one machine; the tests use it).
Every node needs the same Python environment with hybridrl installed, and the same paths: the model, the data and
trainer.default_local_dir must be on a filesystem every node sees (the actors start in the driver's working
directory, so relative paths resolve as they do on the head).
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from hybridrl import HybridRLError

READY_TIMEOUT_S = 120.0     # placement group reserved / actors started and answering
POLL_S = 5.0                # how often the driver looks at the running ranks
# driver environment passed on to every rank (a node's own value wins): hub / cache / comm settings
FORWARD_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "HYBRIDRL_", "NCCL_", "GLOO_",
                        "TORCH_", "PYTORCH_", "SGLANG_", "WANDB_")


def _import_ray(nnodes: int):
    try:
        import ray
    except ImportError:
        raise HybridRLError(f"trainer.nnodes={nnodes} needs Ray: pip install 'hybridrl[ray]'") from None
    return ray


def connect(ray, world: int) -> bool:
    """Join the cluster (RAY_ADDRESS or "auto"), or with HYBRIDRL_RAY_LOCAL=1 start a private one of `world`
    CPUs. True when this call connected (so the caller disconnects at the end); False when Ray was already up."""
    if ray.is_initialized():
        return False
    if os.environ.get("HYBRIDRL_RAY_LOCAL") == "1":
        ray.init(num_cpus=world, include_dashboard=False, log_to_driver=True)
        return True
    address = os.environ.get("RAY_ADDRESS", "auto")
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as e:
        raise HybridRLError(
            f"trainer.nnodes>1 runs on a Ray cluster but none answered at RAY_ADDRESS={address!r} ({e}). Start one "
            "first: `ray start --head --port=6379 --node-ip-address=<this node's IP>` here, "
            "`ray start --address=<HEAD_IP>:6379` on every other node, then run again here (or set RAY_ADDRESS; "
            "HYBRIDRL_RAY_LOCAL=1 starts a one-machine cluster). See docs/multi_node.md") from None
    return True


def check_resources(ray, cfg) -> None:
    """The cluster as a whole must hold what the run asks for (whether it is free is the placement group's wait)."""
    t = cfg.trainer
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    have = ", ".join(f"{n.get('NodeManagerAddress')}: {n['Resources'].get('GPU', 0):g} GPU "
                     f"{n['Resources'].get('CPU', 0):g} CPU" for n in nodes) or "no nodes"
    if t.device != "cpu":
        fit = [n for n in nodes if n["Resources"].get("GPU", 0) >= t.n_gpus_per_node
               and n["Resources"].get("CPU", 0) >= t.n_gpus_per_node]
        if len(fit) < t.nnodes:
            raise HybridRLError(
                f"trainer.nnodes={t.nnodes} x trainer.n_gpus_per_node={t.n_gpus_per_node} on "
                f"trainer.device={t.device} needs {t.nnodes} Ray nodes with {t.n_gpus_per_node} GPUs (and as many "
                f"CPUs) each, but only {len(fit)} of the cluster's nodes have that ({have}). Join more GPU nodes "
                "(`ray start --address=<HEAD_IP>:6379`), lower trainer.nnodes / trainer.n_gpus_per_node, "
                "or use trainer.device=cpu")
    else:
        world = t.nnodes * t.n_gpus_per_node
        cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
        if cpus < world:
            raise HybridRLError(
                f"trainer.nnodes={t.nnodes} x trainer.n_gpus_per_node={t.n_gpus_per_node} on trainer.device=cpu "
                f"needs {world} CPUs (one per rank) but the Ray cluster has {cpus:g} ({have}): join more nodes "
                "or lower trainer.nnodes / trainer.n_gpus_per_node")


def bundles(cfg) -> tuple[list[dict], str]:
    """GPU: one bundle per node, on distinct nodes; CPU: one bundle per rank, packed (one machine may hold all)."""
    t = cfg.trainer
    if t.device != "cpu":
        g = t.n_gpus_per_node
        return [{"GPU": g, "CPU": g} for _ in range(t.nnodes)], "STRICT_SPREAD"
    return [{"CPU": 1} for _ in range(t.nnodes * t.n_gpus_per_node)], "PACK"


def rank_env(ranks: list[tuple[str, str]], rank: int, master: tuple[str, int]) -> dict:
    """The rank variables of `rank`, given each rank's (node_id, ip) as placed and rank 0's (ip, port).

    LOCAL_RANK / LOCAL_WORLD_SIZE / NODE_RANK come from where the ranks really are (on GPU that is rank //
    n_gpus_per_node and rank % n_gpus_per_node, a bundle being one node; on CPU several may share a machine).
    On GPU, Ray gives each actor only its own GPU (CUDA_VISIBLE_DEVICES set to one id): torch numbers it 0, so
    LOCAL_RANK is the device's index among the visible ones (see `RankWorker.device_index`) and the rank's place
    on its node is in HYBRIDRL_LOCAL_RANK. We keep Ray's one-GPU view rather than unhiding the node's GPUs (verl's
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES): a rank's own rollout server, started as a child, inherits it and
    so lands on that rank's GPU, and nothing can touch another rank's device by mistake."""
    order = list(dict.fromkeys(node for node, _ in ranks))        # nodes in order of their first rank
    node = ranks[rank][0]
    on_node = [r for r, (n, _) in enumerate(ranks) if n == node]
    local = on_node.index(rank)
    return {"RANK": str(rank), "WORLD_SIZE": str(len(ranks)), "LOCAL_RANK": str(local),
            "HYBRIDRL_LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(len(on_node)),
            "NODE_RANK": str(order.index(node)), "MASTER_ADDR": master[0], "MASTER_PORT": str(master[1])}


class RankWorker:
    """One rank, in its own Ray actor process (the class is made remote in `launch_on_ray`)."""

    def info(self) -> tuple[str, str]:
        import ray
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def free_port(self, host: str) -> int:
        """A TCP port free on this node, for torch's rendezvous store; IPv4 or IPv6 host alike."""
        family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.bind(addr)
            return s.getsockname()[1]

    def device_index(self) -> int:
        """This actor's GPU as torch numbers it: its place among CUDA_VISIBLE_DEVICES (0 under Ray's default)."""
        import ray
        ids = [str(i) for i in ray.get_gpu_ids()]
        if not ids:
            return 0
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        return visible.index(ids[0]) if ids[0] in visible else int(ids[0]) if ids[0].isdigit() else 0

    def run(self, cfg_dict: dict, errors_dir: str, env: dict, forward: dict, cwd: str, gpu: bool) -> dict:
        for k, v in forward.items():
            os.environ.setdefault(k, v)
        os.environ.update(env)
        if gpu:
            os.environ["LOCAL_RANK"] = str(self.device_index())
        if os.path.isdir(cwd):
            os.chdir(cwd)
        os.makedirs(errors_dir, exist_ok=True)     # on a node that does not share it, so writing it cannot fail
        from hybridrl.launch import rank_main
        return rank_main(cfg_dict, errors_dir)


def _message(ray, e: BaseException) -> str:
    """A Ray error's one line: the rank's own exception when Ray carries it (a HybridRLError's message as is)."""
    cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
    if isinstance(cause, HybridRLError):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


def launch_on_ray(cfg) -> dict:
    """trainer.nnodes x trainer.n_gpus_per_node ranks placed by Ray; rank 0's result (see the module docstring).

    Error messages: the failing rank's line, from the per-rank files in a temp folder (read on the driver, so a
    filesystem shared by all nodes is assumed, as for the run folder), else the exception Ray brought back."""
    ray = _import_ray(cfg.trainer.nnodes)
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from hybridrl.config import to_dict
    from hybridrl.launch import first_error, world_size
    t = cfg.trainer
    world, gpu = world_size(cfg), t.device != "cpu"
    connected = connect(ray, world)
    pg, actors, errors = None, [], Path(tempfile.mkdtemp(prefix="hybridrl-ranks-"))
    try:
        check_resources(ray, cfg)
        specs, strategy = bundles(cfg)
        pg = placement_group(specs, strategy=strategy)
        try:
            ray.get(pg.ready(), timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise HybridRLError(
                f"Ray could not reserve {specs} ({strategy}) within {READY_TIMEOUT_S:.0f} s: the cluster has them "
                "but they are in use (another job, or stale actors: `ray status`), or a node is gone") from None
        per_bundle = t.n_gpus_per_node if gpu else 1
        opts = dict(num_gpus=1, num_cpus=1) if gpu else dict(num_cpus=1)
        remote = ray.remote(RankWorker)
        actors = [remote.options(**opts, max_restarts=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=r // per_bundle)).remote() for r in range(world)]
        try:
            placed = ray.get([a.info.remote() for a in actors], timeout=READY_TIMEOUT_S)
            master_ip = placed[0][1]
            if os.environ.get("HYBRIDRL_RAY_LOCAL") == "1":
                master_ip = "127.0.0.1"               # a one-machine cluster: the rendezvous stays on loopback
            master = (master_ip, ray.get(actors[0].free_port.remote(master_ip), timeout=READY_TIMEOUT_S))
        except ray.exceptions.GetTimeoutError:
            raise HybridRLError(f"the {world} rank actors did not start within {READY_TIMEOUT_S:.0f} s "
                                "(see `ray status` and the Ray logs)") from None
        except ray.exceptions.RayError as e:
            raise HybridRLError(f"the rank actors could not start ({_message(ray, e)}); is hybridrl installed in "
                                "the same Python environment on every node?") from None
        forward = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}
        cfg_dict, cwd = to_dict(cfg), os.getcwd()
        futures = {a.run.remote(cfg_dict, str(errors), rank_env(placed, r, master), forward, cwd, gpu): r
                   for r, a in enumerate(actors)}
        results = {}
        while futures:                                # poll: never one unbounded wait on all ranks
            done, _ = ray.wait(list(futures), num_returns=1, timeout=POLL_S)
            for f in done:
                rank = futures.pop(f)
                try:
                    results[rank] = ray.get(f, timeout=POLL_S)
                except ray.exceptions.RayError as e:
                    for a in actors:                  # the others would wait on a collective that never comes
                        ray.kill(a, no_restart=True)
                    raise HybridRLError(first_error(errors) or f"rank {rank}: {_message(ray, e)}") from None
        return results[0]
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if pg is not None:
            remove_placement_group(pg)
        shutil.rmtree(errors, ignore_errors=True)
        if connected:
            ray.shutdown()
