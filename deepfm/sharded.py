"""DeepFM under TorchRec's DistributedModelParallel, its optimizers, and sharded checkpoints.

- Tables: one EmbeddingBagCollection, sharded by the plan that TorchRec's planner makes for the world
  size and device at hand (table-wise, column-wise, data-parallel on the CPU; row-wise too on GPUs);
  ``sharding: {field: kind}`` in the training config forces a table's sharding type.
- Optimizers: the sparse one is fused into backward (FBGEMM: Adagrad / row-wise Adagrad / SGD on the
  CPU, which refuses Adam); dense parameters (MLP, bias) are data-parallel with torch.optim.Adam.
- The module DistributedModelParallel wraps is the train wrapper :class:`deepfm.model.DeepFMTrain`
  (``model(batch) -> (loss, (loss, logits, labels))``), so TorchRec's train pipeline can run it; for
  model two_tower :class:`deepfm.two_tower.TwoTowerTrain` over :class:`deepfm.two_tower.TwoTower`, on
  the same tables (``sparse.ebc``), optimizers and checkpoints.
- Checkpoints: torch.distributed.checkpoint, keys normalised (no ``module.`` wrappers, no train wrapper)
  so that a checkpoint written at one world size loads at another, and the model's keys are DeepFM's
  own. Folder names come from pipeline.layout: ``checkpoints/step_N`` (model and optimizers) are for
  resuming; ``checkpoints/best`` (model only) holds the weights of the best valid evaluation. Each holds
  the trainer's whole state (:class:`deepfm.state.TrainState`) in meta.json. :func:`load_embeddings`
  reads the tables alone (fnn's start from an fm run: the kinds' dense parts differ, the tables do not).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from deepfm import state as S
from deepfm.cluster import Cluster
from deepfm.model import TOWERS, DeepFM, DeepFMTrain, FieldSpec, table_name
from deepfm.two_tower import TwoTower, TwoTowerTrain
from deepfm.state import TrainState
from deepfm.trainconf import TrainConfig
from pipeline import layout

log = logging.getLogger("deepfm.sharded")
SPARSE_OPTIMIZERS = {"adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad, "sgd": torch.optim.SGD}


class CheckpointError(RuntimeError):
    pass


@dataclass
class Trainable:
    dmp: DistributedModelParallel       # over DeepFMTrain (TwoTowerTrain): dmp(batch) -> (loss, (loss, logits, labels))
    optimizer: CombinedOptimizer
    plan: Any

    @property
    def model(self) -> DeepFM:
        """The (sharded) DeepFM inside the train wrapper: ``model(kjt) -> logits``, for evaluation."""
        return self.dmp.module.model

    @property
    def towers(self) -> TwoTower:
        """The (sharded) TwoTower inside the train wrapper (model two_tower): ``user_vectors(kjt)``,
        ``item_vectors(kjt)``, for evaluation."""
        model = self.dmp.module.model
        if not isinstance(model, TwoTower):
            raise TypeError(f"the model is a {type(model).__name__}, not a TwoTower")
        return model

    def plan_summary(self) -> dict[str, str]:
        """table -> sharding type, for logs and metrics."""
        out = {}
        for _, module_plan in self.plan.plan.items():
            for table, ps in module_plan.items():
                out[table] = f"{ps.sharding_type}:{ps.compute_kernel}"
        return out


def build(fields: Sequence[FieldSpec], cfg: TrainConfig, cluster: Cluster) -> Trainable:
    """DeepFM in its train wrapper under DistributedModelParallel, with its optimizers. ``cfg.bf16`` is
    taken as resolved (deepfm.cluster.resolve_bf16): only ``True`` turns autocast on."""
    torch.manual_seed(cfg.seed)
    model: DeepFM | TwoTower
    wrapper: DeepFMTrain | TwoTowerTrain
    bf16, device_type = cfg.bf16 is True, cluster.device.type
    if cfg.model in TOWERS:
        model = TwoTower(fields, cfg.tower_hidden, cfg.tower_dim, cfg.tower_dropout, sparse_device="meta",
                         dense_device=cluster.device, init_scale=cfg.embedding_init_scale)
        wrapper = TwoTowerTrain(model, cfg.loss, cfg.temperature, cfg.embedding_l2, bf16, device_type)
    else:
        model = DeepFM(fields, cfg.model, cfg.hidden, cfg.dropout, sparse_device="meta", dense_device=cluster.device,
                       init_scale=cfg.embedding_init_scale, crosses=cfg.crosses)
        wrapper = DeepFMTrain(model, cfg.embedding_l2, bf16=bf16, device_type=device_type)
    opt_cls = SPARSE_OPTIMIZERS[cfg.sparse_optimizer]
    sparse_args: dict[str, Any] = {"lr": cfg.sparse_lr}
    if cfg.sparse_optimizer != "sgd":
        sparse_args["eps"] = cfg.sparse_eps
    apply_optimizer_in_backward(opt_cls, model.sparse.ebc.parameters(), sparse_args)
    # Tables are model-parallel unless the config says otherwise: a data-parallel table's optimizer state
    # lives in the dense optimizer, so a plan that moves tables in and out of data-parallel between world
    # sizes would make checkpoints' optimizer state unportable.
    default_types = ["table_wise", "column_wise", "row_wise", "table_row_wise"]
    constraints = {table_name(f.name): ParameterConstraints(sharding_types=[cfg.sharding[f.name]] if f.name in cfg.sharding
                                                            else default_types) for f in fields}
    unknown = [f for f in cfg.sharding if f not in {x.name for x in fields}]
    if unknown:
        raise ValueError(f"sharding.{unknown[0]}: no such field in the data")
    # The planner logs its proposal search, a 60-line statistics table per rank and two warnings about
    # its own defaults at INFO/WARNING; the plan it chose is logged by train.py (Trainable.plan_summary).
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="HeuristicalStorageReservation", category=FutureWarning,
                            module=r"torchrec\.distributed\.planner")
    # DMP's own DDP call uses a deprecated argument; torchrec asks fx whether it is tracing at every input
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    topology = Topology(world_size=cluster.world, compute_device=cluster.device.type,
                        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", cluster.world)))
    sharders = get_default_sharders()
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(wrapper, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=wrapper, device=cluster.device, plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda ps: torch.optim.Adam(ps, lr=cfg.dense_lr, weight_decay=cfg.weight_decay))
    return Trainable(dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), plan)


# --- checkpoints ---------------------------------------------------------------------------------

_WRAPPERS = re.compile(r"(^|\.)(module|_dmp_wrapped_module)\.")
_TRAIN_WRAPPER = "model."       # DeepFMTrain.model: saved keys are DeepFM's own (as before the wrapper)


def _norm_key(k: str) -> str:
    while True:
        n = _WRAPPERS.sub(r"\1", k)
        if n == k:
            return k[len(_TRAIN_WRAPPER):] if k.startswith(_TRAIN_WRAPPER) else k
        k = n


def _normalise(sd: Any) -> Any:
    """Strip DMP/DDP wrapper segments from every key (at any depth), so keys match across world sizes."""
    if isinstance(sd, dict):
        return {(_norm_key(k) if isinstance(k, str) else k): _normalise(v) for k, v in sd.items()}
    return sd


def _denormalise(loaded: Any, like: Any) -> Any:
    """Put loaded values back under the live object's own keys."""
    if isinstance(like, dict) and isinstance(loaded, dict):
        return {k: _denormalise(loaded.get(_norm_key(k) if isinstance(k, str) else k, v), v) for k, v in like.items()}
    return loaded


def _flat_keys(d: Any, prefix: str = "") -> list[str]:
    """DCP's flattened key names: nested dict keys joined by dots."""
    if isinstance(d, dict):
        return [k for key, v in d.items() for k in _flat_keys(v, f"{prefix}{key}.")]
    return [prefix[:-1]]


def _state(t: Trainable, with_optimizer: bool = True) -> dict[str, Any]:
    state = {"model": _normalise(t.dmp.state_dict())}
    if with_optimizer:
        state["optim"] = _normalise(t.optimizer.state_dict())
    return state


def _write(t: Trainable, cluster: Cluster, final: Path, state: TrainState, with_optimizer: bool) -> None:
    """Write a sharded checkpoint (each rank its shards) into final's .tmp sibling, then rename it once
    every rank has written; COMPLETE, written last, marks it usable."""
    tmp = final.parent / f".{final.name}.tmp"
    if cluster.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(t, with_optimizer), checkpoint_id=str(tmp))
    dist.barrier()
    if cluster.is_main:
        S.write(tmp, state)
        (tmp / layout.COMPLETE).write_text("")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()


def save(t: Trainable, cluster: Cluster, run_dir: Path, state: TrainState, keep: int) -> Path:
    """Write checkpoints/step_<global step> (model and optimizers); the last ``keep`` complete ones are kept."""
    final = layout.step_checkpoint(run_dir, state.global_step)
    _write(t, cluster, final, state, with_optimizer=True)
    if cluster.is_main:
        for old in layout.complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def save_best(t: Trainable, cluster: Cluster, run_dir: Path, state: TrainState) -> Path:
    """Write checkpoints/best: the model weights (no optimizer state) of the best valid evaluation so far,
    outside the step_N rotation so that ``keep_checkpoints`` never deletes it."""
    final = layout.best_checkpoint_dir(run_dir)
    _write(t, cluster, final, state, with_optimizer=False)
    return final


def read_state(ckpt: Path) -> TrainState:
    """The trainer state saved in a checkpoint; :class:`CheckpointError` when it has none or it is unreadable."""
    try:
        return S.read(ckpt)
    except S.StateError as e:
        raise CheckpointError(str(e)) from None


def load(t: Trainable, ckpt: Path, fingerprint: str, with_optimizer: bool = True) -> TrainState:
    """Load a checkpoint into a built model (any world size) and return the state saved with it; refuses
    one made for other features."""
    saved = read_state(ckpt)
    if saved.feature_fingerprint != fingerprint:
        raise CheckpointError(f"{ckpt}: made for featurized data with fingerprint {saved.feature_fingerprint}, "
                              f"but this data's is {fingerprint}: the ids mean different things. Train from "
                              "scratch, or featurize with --reuse of the data this model was trained on.")
    live_model = t.dmp.state_dict()
    state: dict[str, Any] = {"model": _normalise(live_model)}
    if with_optimizer:
        t.optimizer.init_state()                   # materialise lazy optimizer state to load into
        live_optim = t.optimizer.state_dict()
        on_disk = set(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
        wanted = set(_flat_keys({"optim": _normalise(live_optim)}))
        if wanted <= on_disk:
            state["optim"] = _normalise(live_optim)
        else:   # e.g. a table forced to another sharding type: its optimizer state has another layout
            log.warning("%s: optimizer state does not fit this plan (%d keys missing, e.g. %s); loading the model "
                        "weights only, the optimizer starts fresh", ckpt, len(wanted - on_disk), sorted(wanted - on_disk)[0])
            with_optimizer = False
    dcp.load(state, checkpoint_id=str(ckpt))
    t.dmp.load_state_dict(_denormalise(state["model"], live_model))
    if with_optimizer:
        t.optimizer.load_state_dict(_denormalise(state["optim"], live_optim))
    return saved


SPARSE_KEYS = "sparse."      # the tables' keys in a checkpoint's model state: sparse.ebc.embedding_bags.t_<field>.weight


def load_embeddings(t: Trainable, ckpt: Path, fingerprint: str) -> TrainState:
    """Load only the embedding tables of a checkpoint (any world size, any plan) into a built model; the
    dense parameters and the optimizers stay as they are. fnn's FM pre-training: the tables of an fm
    run, whose dense part (the bias alone) is not fnn's. Refuses one made for other features."""
    saved = read_state(ckpt)
    if saved.feature_fingerprint != fingerprint:
        raise CheckpointError(f"{ckpt}: made for featurized data with fingerprint {saved.feature_fingerprint}, but "
                              f"this data's is {fingerprint}: the ids mean different things")
    live_model = t.dmp.state_dict()
    tables = {k: v for k, v in _normalise(live_model).items() if k.startswith(SPARSE_KEYS)}
    if not tables:
        raise CheckpointError(f"{ckpt}: the model has no table keys ({SPARSE_KEYS}...) to load")
    state: dict[str, Any] = {"model": tables}
    dcp.load(state, checkpoint_id=str(ckpt))
    t.dmp.load_state_dict(_denormalise(state["model"], live_model))   # the keys not loaded keep their values
    return saved
