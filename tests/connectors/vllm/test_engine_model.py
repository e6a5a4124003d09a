"""The blend path against the engine's own parts: SmolLM2's RoPE as vLLM's CPU kernel and HF
transformers apply it, to position 8K, and the walk from a registered attention layer to the
model that holds it."""

from __future__ import annotations

import json

import pytest
import torch

from connectors.blend.hf_llama import _rope_theta
from connectors.blend.rope import RopeSpec, apply_rope, rerotate
from connectors.vllm.engine_model import (
    EngineModel,
    Unsupported,
    _from_callers,
    find_model,
    served_model,
)

pytestmark = pytest.mark.vllm
T = 96  # rows, each with its own source and target position


@pytest.fixture(scope="module")
def smollm2() -> dict:
    from tests.models import smollm2_dir

    path = smollm2_dir()
    cfg = json.loads((path / "config.json").read_text())
    return {"path": path, "cfg": cfg, "head_dim": int(cfg["head_dim"]),
            "kv_heads": int(cfg["num_key_value_heads"]), "base": _rope_theta(cfg)}  # fmt: skip


def positions(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src, dst = torch.randint(0, 8192, (T,), generator=g), torch.randint(0, 8192, (T,), generator=g)
    src[:4], dst[:4] = torch.tensor([0, 8191, 37, 4096]), torch.tensor([8191, 0, 4133, 8000])
    return src, dst


def engine_rope(m: dict, dtype: torch.dtype):
    """SmolLM2's RoPE as vLLM builds it for the model: ``rotate(keys [T, H*d], pos)``."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    d = m["head_dim"]
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(d, 8192, rope_parameters=m["cfg"].get("rope_parameters"), dtype=dtype)
    assert type(rope).__name__ == "RotaryEmbedding" and rope.base == m["base"]

    def rotate(keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = torch.zeros(keys.shape[0], d, dtype=dtype)
        return rope.forward_cpu(pos, q, keys.clone())[1].view(keys.shape[0], -1, d)

    return rotate


def hf_rope(m: dict):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    emb = LlamaRotaryEmbedding(LlamaConfig.from_pretrained(m["path"]))

    def rotate(keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = keys.view(keys.shape[0], -1, m["head_dim"]).transpose(0, 1)[None]
        cos, sin = emb(x, pos[None])
        return apply_rotary_pos_emb(x, x, cos, sin)[1][0].transpose(0, 1)

    return rotate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reference", ["vllm", "hf"])
def test_rerotation_matches_smollm2_rope_to_8k(smollm2, dtype, reference):
    """Keys the engine stored at one position, moved to another, equal the engine's own keys
    there; re-rotation adds no error beyond the engine's float32 cos/sin table."""
    m, (src, dst) = smollm2, positions(1)
    rotate = engine_rope(m, dtype) if reference == "vllm" else hf_rope(m)
    g = torch.Generator().manual_seed(2)
    raw = torch.randn(T, m["kv_heads"] * m["head_dim"], generator=g).to(dtype)
    spec = RopeSpec(m["head_dim"], m["base"], "neox")
    moved, fresh = rerotate(rotate(raw, src), src, dst, spec), rotate(raw, dst)
    exact = apply_rope(raw.view(T, -1, m["head_dim"]).double(), dst, spec)
    err = (moved.double() - exact).abs().max().item()
    engine_err = (fresh.double() - exact).abs().max().item()
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-23
    # error of the engine's own rotation at 8K plus two roundings of the stored dtype
    assert err <= engine_err + 4 * ulp * float(exact.abs().max()), (err, engine_err)
    wrong = rerotate(rotate(raw, src), src, dst, RopeSpec(m["head_dim"], 10000.0, "neox"))
    assert (wrong.double() - exact).abs().max().item() > 100 * (err + ulp), "the base matters"
    swapped = rerotate(rotate(raw, src), src, dst, RopeSpec(m["head_dim"], m["base"], "gptj"))
    assert (swapped.double() - exact).abs().max().item() > 100 * (err + ulp), "the layout too"


class _Attn(torch.nn.Module):
    pass


def _tree() -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = torch.nn.ModuleList()
    for _ in range(3):
        layer = torch.nn.Module()
        layer.self_attn = torch.nn.Module()
        layer.self_attn.attn = _Attn()
        root.model.layers.append(layer)
    names = {f"model.layers.{i}.self_attn.attn": root.model.layers[i].self_attn.attn
             for i in range(3)}  # fmt: skip
    return root, names


def test_served_model_is_the_root_holding_every_layer():
    root, names = _tree()
    assert served_model(names) is root
    other, _ = _tree()  # another model alive in the process does not confuse the walk
    assert served_model(names) is root and other is not root


_KEEP: list[torch.nn.Module] = []  # alive, yet in no caller's locals


class _Runner:
    """As vLLM's model runner: holds the model, calls the connector's register."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def register(self, names: dict[str, torch.nn.Module]) -> torch.nn.Module:
        return served_model(names)


def _detached_names() -> dict[str, torch.nn.Module]:
    root, names = _tree()
    _KEEP.append(root)
    return names


def test_served_model_comes_from_the_caller_or_from_the_heap():
    root, names = _tree()
    runner = _Runner(root)
    del root  # only the runner's self.model holds it now, as in vLLM
    assert _from_callers(names) is runner.model  # through this frame's runner.model
    assert runner.register(names) is runner.model
    names = _detached_names()  # no frame holds the model: the heap scan finds it
    assert _from_callers(names) is None
    assert find_model(names) == (_KEEP[-1], "heap")


def test_served_model_refuses_layers_it_cannot_place():
    root, names = _tree()
    with pytest.raises(Unsupported, match="no attention layers"):
        served_model({})
    with pytest.raises(Unsupported, match="no module holds"):
        served_model({"model.layers.0.self_attn.attn": _Attn()})
    lying = dict(names)
    lying["model.layers.2.self_attn.attn"] = names["model.layers.1.self_attn.attn"]
    with pytest.raises(Unsupported, match="layers.2"):
        served_model(lying)
    with pytest.raises(Unsupported, match="no embed_tokens"):
        EngineModel(root, list(names))
    root.model.embed_tokens, root.model.norm = torch.nn.Embedding(4, 4), torch.nn.Identity()
    with pytest.raises(Unsupported, match="lacks"):  # no norms, projections or MLP
        EngineModel(root, list(names))
