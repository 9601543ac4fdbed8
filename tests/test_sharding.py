"""``rllama_jax.distributed``: mesh-string parsing and partition rules in-process (no devices
needed), and sharded train_step / generation / loading on 4 emulated CPU devices in a
subprocess (``tests/sharding_checks.py``), since the device-count flag must be set before
JAX starts and would change every other test's device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rllama_jax.distributed import (
    apply_precision,
    batch_spec,
    compute_config,
    make_mesh,
    param_spec,
    parse_mesh_spec,
    state_spec,
)
from rllama_jax.distributed.rules import fit_axes
from rllama_jax.memory import LatentConfig, MemoryState
from rllama_jax.memory.latent import init_adapter
from rllama_jax.models import LlamaConfig, param_shapes
from rllama_jax.models.lora import LoraConfig, init_lora
from rllama_jax.train import TrainConfig, TrainState
from rllama_jax.train.state import make_optimizer

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8,
)  # fmt: skip
SIZES = {"data": 2, "fsdp": 2, "tensor": 2}


# ---------------------------------------------------------------------------- mesh strings
@pytest.mark.parametrize(
    "spec, devices, expected",
    [
        ("data:2,fsdp:2,tensor:1", 4, (2, 2, 1)),
        ("fsdp:2,tensor:2", 4, (1, 2, 2)),
        ("tensor:2, data : 4", 8, (4, 1, 2)),
        ("data:-1,tensor:2", 8, (4, 1, 2)),
        ("fsdp:-1", 1, (1, 1, 1)),
        ("data:2,fsdp:3", None, (2, 3, 1)),
    ],
)
def test_parse_mesh_spec(spec, devices, expected):
    sizes = parse_mesh_spec(spec, devices)
    assert list(sizes) == ["data", "fsdp", "tensor"]
    assert tuple(sizes.values()) == expected


@pytest.mark.parametrize(
    "spec, devices, message",
    [
        ("data:2,fsdp:2", 8, r"= 4 devices, but there are 8"),
        ("data:4,tensor:2", 4, r"= 8 devices, but there are 4"),
        ("data:-1,fsdp:-1", 4, "only one axis may be -1"),
        ("data:-1,fsdp:3", 4, "do not divide"),
        ("data:-1", None, "needs the device count"),
        ("pipeline:2", 2, "unknown mesh axis 'pipeline'"),
        ("data:2,data:2", 4, "appears twice"),
        ("data=2", 2, "is not 'axis:size'"),
        ("data:two", 2, "not an integer"),
        ("data:0", 2, "sizes are >= 1"),
        ("", 2, "empty mesh spec"),
    ],
)
def test_parse_mesh_spec_errors(spec, devices, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh_spec(spec, devices)


def test_make_mesh_on_this_process_devices():
    n = len(jax.devices())
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": n, "fsdp": 1, "tensor": 1}
    assert dict(make_mesh({"fsdp": n}).shape) == {"data": 1, "fsdp": n, "tensor": 1}
    with pytest.raises(ValueError, match=f"there are {n}"):
        make_mesh(f"data:{2 * n}")
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 1})


# ---------------------------------------------------------------------------- partition rules
# (path, expected spec on a 2 x 2 x 2 mesh for MODEL): Megatron on heads/MLP width, fsdp on
# the model width, vocabulary on tensor, small things replicated.
PARAM_TABLE = [
    ("embed", P("tensor", "fsdp")),
    ("lm_head", P("fsdp", "tensor")),
    ("final_norm", P()),
    ("layers/attn_norm", P()),
    ("layers/mlp_norm", P()),
    ("layers/wq", P(None, "fsdp", "tensor")),
    ("layers/wk", P(None, "fsdp", "tensor")),
    ("layers/wv", P(None, "fsdp", "tensor")),
    ("layers/wo", P(None, "tensor", "fsdp")),
    ("layers/w_gate", P(None, "fsdp", "tensor")),
    ("layers/w_up", P(None, "fsdp", "tensor")),
    ("layers/w_down", P(None, "tensor", "fsdp")),
]


def _flat_shapes(shapes) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat[0]}


def test_every_llama_parameter_has_its_rule():
    shapes = _flat_shapes(param_shapes(MODEL))
    assert sorted(shapes) == sorted(path for path, _ in PARAM_TABLE)
    for path, expected in PARAM_TABLE:
        assert param_spec(path, shapes[path], SIZES, MODEL.head_dim) == expected, path
        # Dotted paths and deeper paths (inside the train state) match by suffix.
        dotted = "trainable.model." + path.replace("/", ".")
        assert param_spec(dotted, shapes[path], SIZES, MODEL.head_dim) == expected


def test_rules_never_split_a_dimension_that_does_not_divide():
    # vocab 97 is odd: the embedding keeps fsdp on the width only.
    assert param_spec("embed", (97, 32), SIZES) == P(None, "fsdp")
    assert param_spec("lm_head", (32, 97), SIZES) == P("fsdp")
    # 3 heads of 8: the 24 columns divide by 2, the heads do not; head_dim=1 ignores heads.
    assert param_spec("layers/wq", (2, 32, 24), SIZES, head_dim=8) == P(None, "fsdp")
    assert param_spec("layers/wq", (2, 32, 24), SIZES, head_dim=1) == P(None, "fsdp", "tensor")
    assert param_spec("layers/wo", (2, 24, 32), SIZES, head_dim=8) == P(None, None, "fsdp")
    # Size-1 axes are dropped; a 4-way fsdp axis does not divide 6.
    assert param_spec("layers/w_up", (2, 32, 64), {"data": 8}) == P()
    assert param_spec("layers/w_up", (2, 6, 64), {"fsdp": 4, "tensor": 2}) == P(
        None, None, "tensor"
    )
    # A leaf whose rank differs from its rule's (e.g. a factored moment) is replicated.
    assert param_spec("layers/wq", (32,), SIZES) == P()


def test_fit_axes():
    assert fit_axes(8, ("data", "fsdp"), SIZES) == ("data", "fsdp")
    assert fit_axes(6, ("data", "fsdp"), SIZES) == "data"
    assert fit_axes(3, ("data", "fsdp"), SIZES) is None
    assert fit_axes(24, "tensor", {"tensor": 2}, unit=8) is None
    assert fit_axes(32, "tensor", {"tensor": 2}, unit=8) == "tensor"
    assert fit_axes(8, None, SIZES) is None


def test_lora_heads_and_latent_rules():
    lora = jax.eval_shape(
        lambda: init_lora(jax.random.key(0), MODEL, LoraConfig(rank=4, targets=("wq", "wo")))
    )
    specs = jax.tree_util.tree_map_with_path(
        lambda p, x: param_spec(("lora",) + tuple(p), x.shape, SIZES, 8), lora
    )
    # Adapters follow their base weight's tensor split; rank and width stay whole.
    assert specs["wq"] == {"a": P(), "b": P(None, None, "tensor")}
    assert specs["wo"] == {"a": P(None, "tensor"), "b": P()}
    assert param_spec("heads/value/w", (32, 1), SIZES) == P()
    assert param_spec("trainable/heads/q/w1", (32, 64), SIZES) == P()
    assert param_spec("log_alpha", (), SIZES) == P()
    adapter = jax.eval_shape(lambda: init_adapter(jax.random.key(0), LatentConfig(32, 32)))
    for name, leaf in adapter.items():
        assert param_spec(("trainable", "latent", name), leaf.shape, SIZES) == P(), name


def test_optimizer_state_follows_its_parameter():
    cfg = TrainConfig(algorithm="ppo", trainable="full")
    shapes = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
        param_shapes(MODEL),
        is_leaf=lambda x: isinstance(x, tuple),
    )
    trainable = {"model": shapes, "heads": {"value": {"w": jax.ShapeDtypeStruct((32, 1), "f4")}}}
    opt = jax.eval_shape(make_optimizer(cfg).init, trainable)
    seen = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt)[0]:
        spec = state_spec(("opt_state",) + tuple(path), leaf.shape, SIZES, 8)
        keys = jax.tree_util.keystr(path)
        if keys.endswith("['layers']['wq']"):
            assert spec == P(None, "fsdp", "tensor"), keys
            seen += 1
        elif keys.endswith("['embed']"):
            assert spec == P("tensor", "fsdp"), keys
        elif leaf.ndim == 0:
            assert spec == P(), keys  # step counts
    assert seen == 2  # Adam's mu and nu


def test_batch_and_state_specs():
    assert batch_spec((8, 2, 6), SIZES) == P(("data", "fsdp"))
    assert batch_spec((6, 2), SIZES) == P("data")
    assert batch_spec((3,), SIZES) == P()
    assert batch_spec((), SIZES) == P()
    assert state_spec("replay/data/obs/prompt_tokens", (16, 6), SIZES) == P(("data", "fsdp"))
    assert state_spec("replay/count", (), SIZES) == P()
    assert state_spec("memory/working/keys", (4, 3, 32), SIZES) == P(("data", "fsdp"))
    assert state_spec("memory/episodic/keys", (64, 32), SIZES) == P()
    assert state_spec("rng", (), SIZES) == P()
    assert state_spec("frozen/model/layers/wv", (2, 32, 16), SIZES, 8) == P(None, "fsdp", "tensor")


# ---------------------------------------------------------------------------- precision
def test_precision_casts():
    assert compute_config(MODEL, "bf16").dtype == "bfloat16"
    assert compute_config(MODEL, "fp32") is MODEL
    with pytest.raises(ValueError, match="precision='fp16'"):
        compute_config(MODEL, "fp16")
    state = TrainState(
        trainable={"heads": {"w": jnp.zeros((2, 2), jnp.bfloat16)}},
        frozen={"model": {"embed": jnp.zeros((4, 2))}},
        target={},
        opt_state=({"mu": jnp.zeros((2, 2), jnp.bfloat16)}, jnp.zeros((), jnp.int32)),
        replay=None,
        memory=MemoryState(),
        rng=jax.random.key(0),
        step=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )
    mixed = apply_precision(state, "bf16")
    assert mixed.frozen["model"]["embed"].dtype == jnp.bfloat16
    assert mixed.trainable["heads"]["w"].dtype == jnp.float32
    assert mixed.opt_state[0]["mu"].dtype == jnp.float32
    assert mixed.opt_state[1].dtype == jnp.int32
    assert apply_precision(state, "fp32") is state


def test_loader_places_parameters_into_given_shardings(tmp_path):
    """``load_pretrained(shardings=...)`` (a tree or a function of the config) and
    ``load_sharded`` read the same numbers as a plain load, into the requested shardings."""
    from jax.sharding import NamedSharding

    from rllama_jax.distributed import load_sharded
    from rllama_jax.models import init_params, load_pretrained
    from rllama_jax.models.native_format import save_native

    save_native(str(tmp_path), jax.device_get(init_params(MODEL, jax.random.key(0))), MODEL)
    _, plain, _ = load_pretrained(str(tmp_path), tokenizer=False)
    mesh = make_mesh()
    tree = jax.tree.map(lambda _: NamedSharding(mesh, P()), plain)
    for loaded in (
        load_pretrained(str(tmp_path), tokenizer=False, shardings=tree).params,
        load_pretrained(str(tmp_path), tokenizer=False, shardings=lambda cfg: tree).params,
        load_sharded(str(tmp_path), mesh, tokenizer=False).params,
    ):
        jax.tree.map(np.testing.assert_array_equal, loaded, plain)
        assert all(isinstance(x.sharding, NamedSharding) for x in jax.tree.leaves(loaded))


# ---------------------------------------------------------------------------- 4 devices
@pytest.fixture(scope="module")
def checks() -> dict:
    """Runs every case of ``sharding_checks.py`` once (one JAX start, ~2 CPU-minutes)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharding_checks.py"), "all"],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=os.path.dirname(HERE),
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            results[item["case"]] = item
    assert results, f"no results (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return results


def _case(checks: dict, name: str) -> dict:
    assert name in checks, sorted(checks)
    result = checks[name]
    assert "error" not in result, result["error"]
    return result


def sharding_tolerance(key: str, update_size: float) -> float:
    """1e-5 for losses, optimizer moments, targets and replay; the parameters also get 0.1%
    of the largest parameter move. A sharded step sums the same gradient terms in another
    order (float32 rounding), and Adam divides each gradient by its own running RMS: an
    element whose gradient nearly cancels can move by a visibly different fraction of the
    learning rate (seen: one `wo` element of DQN's full fine-tuning, 1.2e-5 off on a 1.2e-2
    move, with every moment within 1e-5)."""
    return 1e-5 + (1e-3 * update_size if key == "trainable_diff" else 0.0)


@pytest.mark.parametrize("case", ["train_ppo", "train_dqn"])
def test_sharded_train_step_matches_one_device(checks, case):
    """(4,1,1), (2,2,1), (1,2,2): two steps give the single-device losses, parameters,
    optimizer state, targets and replay buffer within 1e-5."""
    result = _case(checks, case)
    assert set(result["meshes"]) == {"4,1,1", "2,2,1", "1,2,2"}
    assert result["update_size"] > 1e-3  # the parameters really moved
    for mesh, info in result["meshes"].items():
        assert info["step"] == 2
        for key, value in info.items():
            if key.endswith("_diff"):
                assert value <= sharding_tolerance(key, result["update_size"]), (mesh, key, value)
    assert result["ok"]


def test_parameters_and_state_really_sharded(checks):
    ppo, dqn = _case(checks, "train_ppo")["meshes"], _case(checks, "train_dqn")["meshes"]
    # Frozen base (LoRA) and full model: wq [2, 32, 32] split 2 x 2 on (1, 2, 2).
    for meshes in (ppo, dqn):
        assert meshes["1,2,2"]["wq_spec"] == "P(None, 'fsdp', 'tensor')"
        assert meshes["1,2,2"]["wq_shards"] == [[2, 16, 16]]
        assert meshes["2,2,1"]["wq_shards"] == [[2, 16, 32]]
        assert meshes["4,1,1"]["wq_spec"] == "P()"  # pure data parallelism replicates
    assert ppo["1,2,2"]["lora_wq_b_spec"] == "P(None, None, 'tensor')"
    assert dqn["1,2,2"]["mu_wq_spec"] == "P(None, 'fsdp', 'tensor')"  # Adam moments too
    assert dqn["2,2,1"]["replay_spec"] == "P(('data', 'fsdp'),)"
    placement = _case(checks, "placement")
    assert placement["num_devices"] == 4
    assert placement["specs"]["['layers']['w_down']"] == "P(None, 'tensor', 'fsdp')"
    assert placement["shards"]["['layers']['w_down']"] == [[2, 32, 16]]
    assert placement["shards"]["['embed']"] == [[32, 16]]  # [64, 32] split 2 x 2
    assert placement["load_diff"] == 0.0  # sharded loading reads the same numbers
    assert placement["shard_params_same_sharding"]


def test_sharded_generation_scoring_and_acting(checks):
    result = _case(checks, "generate")
    assert result["tokens_equal"], result["tokens"]
    assert result["act_actions_equal"]
    assert max(result["logprob_diff"], result["score_diff"], result["act_diff"]) <= 1e-5
    assert result["tokens_spec"] == "P('fsdp',)"  # rows stay split over the batch axes
    assert result["ok"]


def test_bf16_mixed_precision(checks):
    """bf16 compute on float32 masters: the loss is within bf16 tolerance of float32's,
    the trainable parameters and optimizer state stay float32, frozen weights are bf16."""
    bf16 = _case(checks, "train_ppo")["bf16"]
    assert np.isfinite(bf16["loss"])
    assert bf16["loss_diff"] <= 2e-2 * max(1.0, abs(bf16["fp32_loss"])), bf16
    assert bf16["trainable_dtypes"] == ["float32"]
    assert bf16["opt_state_dtypes"] == ["float32"]
    assert bf16["frozen_dtypes"] == ["bfloat16"]
