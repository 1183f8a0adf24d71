"""Loading diffusers-format folders: formats, variants, key names, strictness, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vqdiff_cli import GenerateOptions, VQDiffusion
from vqdiff_cli.errors import WeightsError

from .compare import HALF_LOG_P_TOLERANCE, agreement, half_log_p_error
from .tiny import current_vq_state, resave

OPTS = GenerateOptions(seed=5, guidance_scale=3.0)


@pytest.fixture(scope="module")
def expected_tokens(tiny_pipe):
    return tiny_pipe.generate("a red ball", OPTS)[0].tokens


@pytest.mark.parametrize(("fmt", "new_names"), [("safetensors", False), ("safetensors", True), ("bin", True)])
def test_formats_and_key_names_give_identical_tokens(tiny, tmp_path, expected_tokens, fmt, new_names):
    path = resave(tiny.path, tmp_path / "copy", fmt=fmt, new_vq_names=new_names)
    pipe = VQDiffusion.from_pretrained(path, device="cpu")
    assert torch.equal(pipe.generate("a red ball", OPTS)[0].tokens, expected_tokens)


def test_the_hub_layout_fixture_is_read_by_diffusers_and_transformers_themselves(tiny):
    """The fixture's files hold the Hub's key names as diffusers and transformers read them (their own renaming on
    load, independent of vqdiff's tables): the old VQ attention names and `text_model.`-prefixed CLIP keys load into
    their classes with every tensor in place; the new-name copy of `resave` has exactly VQModel's keys."""
    from diffusers import VQModel
    from transformers import CLIPTextModel

    state = torch.load(tiny.path / "vqvae" / "diffusion_pytorch_model.bin", weights_only=True)
    assert {k.rsplit(".", 2)[-2] for k in state if ".attentions." in k} == {
        "group_norm",
        "query",
        "key",
        "value",
        "proj_attn",
    }
    assert set(current_vq_state(state)) == set(tiny.vqvae.state_dict())
    for folder, cls, reference in (("vqvae", VQModel, tiny.vqvae), ("text_encoder", CLIPTextModel, tiny.text_encoder)):
        loaded = cls.from_pretrained(str(tiny.path / folder)).state_dict()
        expected = reference.state_dict()
        assert set(loaded) == set(expected), folder
        assert all(torch.equal(loaded[k], v) for k, v in expected.items()), folder
    text = torch.load(tiny.path / "text_encoder" / "pytorch_model.bin", weights_only=True)
    assert all(k.startswith("text_model.") for k in text)


def test_config_with_norm_type_loads(tiny, tmp_path, expected_tokens):
    """A config saved by today's diffusers says norm_type 'ada_norm'; the Hub's has none. Both load."""
    path = tmp_path / "copy"
    shutil.copytree(tiny.path, path)
    cfg_path = path / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["norm_type"] = "ada_norm"
    cfg_path.write_text(json.dumps(cfg))
    assert torch.equal(
        VQDiffusion.from_pretrained(path, device="cpu").generate("a red ball", OPTS)[0].tokens, expected_tokens
    )


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_fp16_variant_files(tiny, tiny_pipe, tmp_path, fmt):
    """fp16 files load as the float32 weights rounded to float16 (then to the run's dtype), and the model computes
    what float32 computes within that rounding (tolerances and measurements: tests/compare.py)."""
    path = resave(tiny.path, tmp_path / "fp16", fmt=fmt, variant="fp16")
    full = tiny_pipe.components.transformer.state_dict()
    for dtype in ("float32", "bfloat16"):
        pipe = VQDiffusion.from_pretrained(path, device="cpu", dtype=dtype)
        assert pipe.components.variants["transformer"] == "fp16"
        loaded = pipe.components.transformer.state_dict()
        target = getattr(torch, dtype)
        assert all(torch.equal(loaded[k], v.half().to(target)) for k, v in full.items())
        # float32 on fp16 weights: only the weights' rounding (measured 0.0035); bfloat16: the bfloat16 run's
        tolerance = HALF_LOG_P_TOLERANCE["float16" if dtype == "float32" else dtype]
        assert half_log_p_error(pipe, tiny_pipe) < tolerance
    options = GenerateOptions(seed=1, steps=10, num_images=2, batch_size=2)
    got = pipe.generate("a red ball", options)
    assert agreement([r.tokens for r in got], [r.tokens for r in tiny_pipe.generate("a red ball", options)]) >= 0.75
    # asked for fp32 files explicitly: there are none
    with pytest.raises(WeightsError, match="no weights for"):
        VQDiffusion.from_pretrained(path, device="cpu", variant="fp32")


def test_both_variants_present_picks_by_dtype(tiny, tmp_path):
    path = resave(tiny.path, tmp_path / "both", fmt="safetensors", variant="fp16")
    for component in ("vqvae", "transformer", "text_encoder", "learned_classifier_free_sampling_embeddings"):
        for f in (tiny.path / component).glob("*.bin"):
            shutil.copy(f, path / component / f.name)
    assert VQDiffusion.from_pretrained(path, device="cpu").components.variants["transformer"] == "fp32"
    half = VQDiffusion.from_pretrained(path, device="cpu", dtype="bfloat16")
    assert half.components.variants["transformer"] == "fp16"


def _mutate_transformer(src, dst, change):
    shutil.copytree(src, dst)
    f = dst / "transformer" / "diffusion_pytorch_model.bin"
    state = torch.load(f, weights_only=True)
    change(state)
    torch.save(state, f)
    return dst


def test_missing_tensor_is_named(tiny, tmp_path):
    path = _mutate_transformer(tiny.path, tmp_path / "c", lambda s: s.pop("norm_out.weight"))
    with pytest.raises(WeightsError, match=r"transformer weights .*missing norm_out\.weight"):
        VQDiffusion.from_pretrained(path, device="cpu")


def test_unexpected_tensor_is_named(tiny, tmp_path):
    path = _mutate_transformer(tiny.path, tmp_path / "c", lambda s: s.update(extra_thing=torch.zeros(1)))
    with pytest.raises(WeightsError, match="unexpected extra_thing"):
        VQDiffusion.from_pretrained(path, device="cpu")


def test_wrong_shape_is_named(tiny, tmp_path):
    path = _mutate_transformer(tiny.path, tmp_path / "c", lambda s: s.update({"out.bias": torch.zeros(3)}))
    with pytest.raises(WeightsError, match=r"wrong shape out\.bias \(3,\) != \(16,\)"):
        VQDiffusion.from_pretrained(path, device="cpu")


def test_missing_null_embedding_component(tiny, tmp_path):
    """The Hub's old fp16 branch: model_index.json without the learned embeddings."""
    path = tmp_path / "c"
    shutil.copytree(tiny.path, path)
    index = json.loads((path / "model_index.json").read_text())
    del index["learned_classifier_free_sampling_embeddings"]
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"learned_classifier_free_sampling_embeddings") as e:
        VQDiffusion.from_pretrained(path, device="cpu")
    assert "fp16" in (e.value.hint or "")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(WeightsError, match=r"no model_index\.json"):
        VQDiffusion.from_pretrained(tmp_path, device="cpu")


def test_corrupt_weights_file(tiny, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(tiny.path, path)
    (path / "vqvae" / "diffusion_pytorch_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(WeightsError, match="cannot read weights"):
        VQDiffusion.from_pretrained(path, device="cpu")


class _Payload:
    """Pickles as a call that creates `marker`: what unrestricted unpickling would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["torch.save", "pickle.dump"])
def test_pickle_with_code_is_refused_without_running_it(tiny, tmp_path, container):
    """weights_only loading: a .bin that would run code is an error, and the code never runs; the message says so
    in one short line, without torch's advice to load it unrestricted."""
    import pickle

    marker = tmp_path / "payload-ran"
    path = tmp_path / "c"
    shutil.copytree(tiny.path, path)
    target = path / "vqvae" / "diffusion_pytorch_model.bin"
    state = {"encoder.conv_in.weight": torch.zeros(1), "x": _Payload(marker)}
    if container == "torch.save":  # the zip format every .bin of the Hub has: its pickle reaches the unpickler
        torch.save(state, target)
    else:  # the legacy format
        with open(target, "wb") as f:
            pickle.dump(state, f)
    with pytest.raises(WeightsError) as refused:
        VQDiffusion.from_pretrained(path, device="cpu")
    assert not marker.exists(), "the pickled payload ran"
    if container == "torch.save":
        e = refused.value
        said = "holds pickled objects that are not plain tensors, and vqdiff never runs such code"
        assert e.message == f"{target} {said}"
        assert "safetensors" in e.hint and "trust" in e.hint
        line = f"{e.message}; {e.hint}"
        assert "\n" not in line and len(line) - len(str(target)) < 200
        assert "weights_only" not in line


def test_unsupported_config_value(tiny, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(tiny.path, path)
    cfg_path = path / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["activation_fn"] = "geglu"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="activation_fn"):
        VQDiffusion.from_pretrained(path, device="cpu")


def test_empty_vqvae_block_lists_are_refused(tiny, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(tiny.path, path)
    cfg_path = path / "vqvae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(down_block_types=[], up_block_types=[], block_out_channels=[])
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="empty block lists"):
        VQDiffusion.from_pretrained(path, device="cpu")


def test_mismatched_components(tiny, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(tiny.path, path)
    cfg_path = path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_vec_classes"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="num_vec_classes=99"):
        VQDiffusion.from_pretrained(path, device="cpu")


def test_safetensors_written_with_shared_storage_and_checked(tmp_path):
    from safetensors.torch import load_file

    from vqdiff_cli.checkpoint.convert import safetensors_header, save_safetensors

    base = torch.arange(12.0)
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": base[:6], "b": base[6:], "tied": base[:6]}, path)
    assert {k: v.tolist() for k, v in load_file(str(path)).items()} == {
        "a": base[:6].tolist(),
        "b": base[6:].tolist(),
        "tied": base[:6].tolist(),
    }
    assert safetensors_header(path)["a"]["shape"] == [6]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    with pytest.raises(WeightsError, match="truncated or damaged"):
        safetensors_header(path)
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        safetensors_header(path)
