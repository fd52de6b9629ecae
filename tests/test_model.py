"""Model loading (random, checkpoint, tags), signatures, and refusing a mismatched model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARCH, make_scene, write_scenes
from PIL import Image

from indexer import index_folders
from indexer.model_choice import resolve_model_spec
from retrieval.core.errors import ModelLoadError, ModelMismatchError
from retrieval.embedding.clip_model import ClipModel, _hub_reachable
from retrieval.embedding.devices import resolve_precision
from retrieval.embedding.spec import (
    CONFIG_DIR,
    ModelSignature,
    ModelSpec,
    check_spec_matches,
    default_pretrained,
)
from retrieval.index import ImageIndex

NO_BF16_CPU = frozenset({"avx2", "fma"})
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def tiny2_config(tmp_path_factory):
    """Another small architecture (32-d), given as a config file path."""
    cfg = json.loads((CONFIG_DIR / f"{TINY_ARCH}.json").read_text())
    cfg["embed_dim"] = 32
    path = tmp_path_factory.mktemp("cfg") / "clipdex-tiny2.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture
def indexed_with_a(tmp_path, index_dir, tiny_checkpoint):
    """An index built from checkpoint A."""
    write_scenes(tmp_path / "photos", 3)
    index_folders([tmp_path / "photos"], index_dir, model=ModelSpec(TINY_ARCH, str(tiny_checkpoint), "cpu"))
    return index_dir


def test_random_signature_records_arch_weights_dim_preprocess(tiny_clip_model):
    sig = tiny_clip_model.signature
    assert sig.arch == TINY_ARCH
    assert sig.weights_id == "random:seed=0" and sig.pretrained == "random" and sig.seed == 0
    assert sig.dim == 64 == tiny_clip_model.dim
    assert sig.preprocess["size"] == [64, 64]
    np.testing.assert_allclose(sig.preprocess["mean"], OPENAI_MEAN)
    np.testing.assert_allclose(sig.preprocess["std"], OPENAI_STD)
    assert sig.preprocess["interpolation"] and sig.preprocess["resize_mode"]
    assert ModelSignature.from_dict(json.loads(json.dumps(sig.to_dict()))) == sig


def test_random_weights_are_seeded(tiny_clip_model, other_clip_model):
    again = ClipModel(ModelSpec(TINY_ARCH, "random", "cpu"))
    texts = ["a cat", "a dog"]
    np.testing.assert_array_equal(again.encode_texts(texts), tiny_clip_model.encode_texts(texts))
    assert not np.allclose(other_clip_model.encode_texts(texts), tiny_clip_model.encode_texts(texts))
    assert other_clip_model.signature.weights_id == "random:seed=1"
    assert not other_clip_model.signature.matches(tiny_clip_model.signature)


def test_checkpoint_signature_and_weights(tiny_checkpoint, tiny_clip_model):
    spec = ModelSpec(TINY_ARCH, str(tiny_checkpoint), "cpu")
    model = ClipModel(spec)
    sig = model.signature
    assert sig.arch == TINY_ARCH and sig.dim == 64
    assert sig.weights_id == "sha256:" + hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert sig.pretrained == str(tiny_checkpoint.resolve())
    assert sig.preprocess == tiny_clip_model.signature.preprocess
    img = make_scene(3)
    np.testing.assert_allclose(model.encode_pil([img]), tiny_clip_model.encode_pil([img]), atol=1e-6)
    # the hash went to the cache named by CLIPDEX_CACHE, not to the user's cache
    cache_file = Path(os.environ["CLIPDEX_CACHE"]) / "checkpoint-hashes.json"
    cache = json.loads(cache_file.read_text())
    assert sig.weights_id.removeprefix("sha256:") in cache.values()


def test_checkpoint_folder_and_moved_copy_have_the_same_identity(tiny_checkpoint, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(tiny_checkpoint, folder / "open_clip_pytorch_model.bin")
    (folder / "readme.txt").write_text("hi")
    a = ModelSpec(TINY_ARCH, str(tiny_checkpoint))
    b = ModelSpec(TINY_ARCH, str(folder))
    c = ModelSpec(TINY_ARCH, str(folder / "open_clip_pytorch_model.bin"))
    assert a.weights_id() == b.weights_id() == c.weights_id()
    assert a.weights_id().startswith("sha256:")


def test_encoders_return_unit_float32_and_count_calls(tiny_clip_model):
    m = tiny_clip_model
    i0, t0 = m.images_encoded, m.texts_encoded
    v = m.encode_pil([make_scene(1), make_scene(2, (50, 120)), Image.new("RGB", (64, 64))])
    t = m.encode_texts(["one", "two"])
    assert v.shape == (3, 64) and t.shape == (2, 64)
    assert v.dtype == np.float32 and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert (m.images_encoded - i0, m.texts_encoded - t0) == (3, 2)
    assert m.encode_texts([]).shape == (0, 64)
    assert m.texts_encoded - t0 == 2


# -- loading errors ---------------------------------------------------------------------------
def test_unknown_tag_is_a_model_load_error():
    with pytest.raises(ModelLoadError, match="neither a pretrained tag"):
        ClipModel(ModelSpec(TINY_ARCH, "no-such-tag", "cpu"))


def test_unknown_architecture_is_a_model_load_error():
    with pytest.raises(ModelLoadError, match="unknown model architecture"):
        ClipModel(ModelSpec("ViT-Nonexistent-99", "random", "cpu"))


def test_missing_and_empty_checkpoint_locations(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        ClipModel(ModelSpec(TINY_ARCH, str(tmp_path / "nope.pt"), "cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no checkpoint"):
        ClipModel(ModelSpec(TINY_ARCH, str(tmp_path / "empty"), "cpu"))


def test_unusable_checkpoints(tmp_path, tiny_checkpoint, tiny2_config):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot load checkpoint"):
        ClipModel(ModelSpec(TINY_ARCH, str(junk), "cpu"))
    with pytest.raises(ModelLoadError, match="cannot load checkpoint"):  # weights of another shape
        ClipModel(ModelSpec(str(tiny2_config), str(tiny_checkpoint), "cpu"))


def test_unreachable_hub_fails_fast_in_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    _clear_proxy_env(monkeypatch)  # a proxy in the environment would answer for 127.0.0.1:9

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # refused at once, network or not
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        ClipModel(ModelSpec("ViT-B-32", "laion2b_s34b_b79k", "cpu"))
    assert time.monotonic() - started < 15
    msg = str(info.value)
    assert "\n" not in msg and "--pretrained" in msg and "laion2b_s34b_b79k" in msg


def test_precision_choices(monkeypatch):
    monkeypatch.delenv("CLIPDEX_PRECISION", raising=False)
    assert resolve_precision("auto", "cpu", NO_BF16_CPU) == "fp32"
    assert resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ModelLoadError, match="fp16"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ModelLoadError, match="unknown precision"):
        resolve_precision("fp8", "cpu")


# -- mismatches -------------------------------------------------------------------------------
def test_signature_matching_ignores_where_the_file_lies(tiny_clip_model):
    sig = tiny_clip_model.signature
    moved = ModelSignature.from_dict({**sig.to_dict(), "pretrained": "/elsewhere/w.pt", "extra": 1})
    assert sig.matches(moved)
    smaller = {**sig.preprocess, "size": [32, 32]}
    other_pre = ModelSignature.from_dict({**sig.to_dict(), "preprocess": smaller})
    assert not sig.matches(other_pre)
    with pytest.raises(ModelMismatchError, match="--reindex"):
        sig.check_compatible(other_pre, "index X")
    other_dim = ModelSignature.from_dict({**sig.to_dict(), "dim": 32})
    assert not sig.matches(other_dim)


def test_index_built_with_checkpoint_a_refuses_checkpoint_b(indexed_with_a, other_checkpoint):
    with pytest.raises(ModelMismatchError) as info:
        ImageIndex.open(indexed_with_a, model=ModelSpec(TINY_ARCH, str(other_checkpoint)))
    assert "--reindex" in str(info.value) and "\n" not in str(info.value)
    with ImageIndex.open(indexed_with_a) as idx, pytest.raises(ModelMismatchError):
        idx.use_model(ModelSpec(TINY_ARCH, str(other_checkpoint), "cpu"))


def test_index_accepts_a_copy_of_its_checkpoint_elsewhere(indexed_with_a, tiny_checkpoint, tmp_path):
    copy = tmp_path / "copy" / "renamed.pt"
    copy.parent.mkdir()
    shutil.copy(tiny_checkpoint, copy)
    spec = ModelSpec(TINY_ARCH, str(copy), "cpu")
    with ImageIndex.open(indexed_with_a, model=spec) as idx:
        idx.use_model(spec)
        assert len(idx.search_text("a picture", k=2)) == 2


@pytest.mark.parametrize("which", ["other-arch", "config-file-arch", "random-same-arch", "other-seed"])
def test_index_refuses_other_models(indexed_with_a, tiny2_config, which):
    spec = {
        "other-arch": ModelSpec("ViT-B-32", "random"),
        "config-file-arch": ModelSpec(str(tiny2_config), "random"),
        "random-same-arch": ModelSpec(TINY_ARCH, "random"),
        "other-seed": ModelSpec(TINY_ARCH, "random", seed=3),
    }[which]
    with pytest.raises(ModelMismatchError):
        ImageIndex.open(indexed_with_a, model=spec)


def test_indexing_with_another_model_is_refused_and_changes_nothing(
    indexed_with_a, other_clip_model, other_checkpoint, tmp_path
):
    with ImageIndex.open(indexed_with_a) as idx:
        before = idx.catalog.ids().tolist()
        with pytest.raises(ModelMismatchError):
            idx.use_model(other_clip_model)  # an already loaded model is checked too
    write_scenes(tmp_path / "photos", 1, seed0=40, prefix="late")
    for model in (other_clip_model, ModelSpec(TINY_ARCH, str(other_checkpoint), "cpu")):
        with pytest.raises(ModelMismatchError):
            index_folders([tmp_path / "photos"], indexed_with_a, model=model)
    with ImageIndex.open(indexed_with_a) as idx:
        assert idx.catalog.ids().tolist() == before


def test_check_spec_matches_loads_no_model(tiny_clip_model, monkeypatch):
    import retrieval.embedding.clip_model as clip_model_mod

    monkeypatch.setattr(clip_model_mod, "_create", lambda *a: pytest.fail("a model was built"))
    sig = tiny_clip_model.signature
    check_spec_matches(sig, ModelSpec(TINY_ARCH, "random"), "index X")
    with pytest.raises(ModelMismatchError, match="index X"):
        check_spec_matches(sig, ModelSpec(TINY_ARCH, "random", seed=2), "index X")


# -- default weights per architecture ---------------------------------------------------------
def test_default_pretrained_is_the_architectures_own_tag():
    import open_clip

    assert default_pretrained("ViT-B-32") == "laion2b_s34b_b79k"  # the project's default, kept
    assert default_pretrained("ViT-B-16") == open_clip.list_pretrained_tags_by_model("ViT-B-16")[0]
    assert default_pretrained("ViT-B-16-SigLIP") == "webli"
    for arch in (TINY_ARCH, "convnext_tiny"):  # known architectures without any published weights
        with pytest.raises(ModelLoadError) as info:
            default_pretrained(arch)
        msg = str(info.value)
        assert "\n" not in msg and arch in msg and "--pretrained" in msg and "'random'" in msg
    with pytest.raises(ModelLoadError, match="unknown model architecture"):
        default_pretrained("ViT-Nonexistent-99")


def test_resolve_model_spec_uses_the_architectures_default(tmp_path):
    where = tmp_path / "new-index"
    assert resolve_model_spec(where).pretrained == "laion2b_s34b_b79k"
    assert resolve_model_spec(where, "ViT-B-16").pretrained == "openai"
    assert resolve_model_spec(where, "ViT-B-16", "laion2b_s34b_b88k").pretrained == "laion2b_s34b_b88k"
    with pytest.raises(ModelLoadError, match="--pretrained"):
        resolve_model_spec(where, TINY_ARCH)


def test_index_summary_names_the_weights_used(tmp_path, index_dir, tiny_checkpoint):
    from typer.testing import CliRunner

    from cli.main import app

    write_scenes(tmp_path / "photos", 2)
    summary = index_folders([tmp_path / "photos"], index_dir, model=ModelSpec(TINY_ARCH, "random", "cpu"))
    assert summary.model == f"{TINY_ARCH} / random"
    again = index_folders([tmp_path / "photos"], index_dir)  # no model named: the index's own
    assert (again.model, again.unchanged) == (f"{TINY_ARCH} / random", 2)
    other = tmp_path / "index-ckpt"
    model = ["-m", TINY_ARCH, "-p", str(tiny_checkpoint), "--device", "cpu"]
    result = CliRunner().invoke(app, ["index", str(tmp_path / "photos"), "--index", str(other), *model])
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout.splitlines()[0].endswith(f"; model {TINY_ARCH} / {tiny_checkpoint})")


# -- the logit scale and bias are recorded ------------------------------------------------------
def test_signature_records_logit_scale_without_changing_identity(tiny_clip_model):
    sig = tiny_clip_model.signature
    assert sig.logit_scale == pytest.approx(float(tiny_clip_model.model.logit_scale.exp().item()), rel=1e-6)
    assert sig.logit_bias is None  # a CLIP model: softmax over labels, no bias
    # An index written before these fields existed still loads, and is the same model...
    old = {k: v for k, v in sig.to_dict().items() if k not in ("logit_scale", "logit_bias")}
    legacy = ModelSignature.from_dict(old)
    assert legacy.logit_scale is None and legacy.logit_bias is None
    assert legacy.matches(sig) and legacy.key() == sig.key()
    # ...and key() (names of exported ONNX files) is exactly what it was before.
    identity = [sig.arch, sig.weights_id, sig.dim, sig.preprocess]
    assert sig.key() == hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def test_signature_records_logit_bias_of_a_sigmoid_model(tmp_path):
    cfg = json.loads((CONFIG_DIR / f"{TINY_ARCH}.json").read_text())
    cfg["init_logit_bias"] = -3.5  # open_clip's CLIP then has a learnable logit_bias, as SigLIP
    path = tmp_path / "clipdex-sigmoid-tiny.json"
    path.write_text(json.dumps(cfg))
    sig = ClipModel(ModelSpec(str(path), "random", "cpu")).signature
    assert sig.logit_bias == pytest.approx(-3.5) and sig.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)


# -- hub probe: honours HTTPS_PROXY / HTTP_PROXY / NO_PROXY -------------------------------------
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "REQUEST_METHOD")


def _clear_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@dataclass
class FakeProxy:
    """A loopback HTTP server answering every request (HEAD, GET, CONNECT) with `status`."""

    url: str
    status: int = 404
    seen: list[str] = field(default_factory=list)  # request lines, in order


@pytest.fixture
def fake_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProxy]:
    _clear_proxy_env(monkeypatch)
    proxy = FakeProxy(url="")

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            proxy.seen.append(self.requestline)  # recorded before answering: the probe sees it after
            self.send_response(proxy.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = do_CONNECT = answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield proxy
    server.shutdown()
    server.server_close()
    thread.join()


def test_hub_probe_tunnels_through_the_https_proxy(fake_proxy, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # closed: only the proxy can answer
    monkeypatch.setenv("HTTPS_PROXY", fake_proxy.url)
    fake_proxy.status = 403  # the proxy refuses the tunnel: the hub is out of reach
    assert _hub_reachable(timeout=10) is False
    assert len(fake_proxy.seen) == 1 and fake_proxy.seen[0].startswith("CONNECT 127.0.0.1:9 HTTP/")


@pytest.mark.parametrize(("status", "reachable"), [(200, True), (404, True), (502, False), (504, False)])
def test_hub_probe_counts_an_http_answer_through_the_proxy(fake_proxy, monkeypatch, status, reachable):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", fake_proxy.url)
    fake_proxy.status = status  # 502/504: the proxy itself could not reach the hub
    assert _hub_reachable(timeout=10) is reachable
    assert len(fake_proxy.seen) == 1 and fake_proxy.seen[0].startswith("HEAD http://127.0.0.1:9")


def test_hub_probe_goes_direct_for_no_proxy_hosts(fake_proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", fake_proxy.url)
    monkeypatch.setenv("HTTPS_PROXY", fake_proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert _hub_reachable(timeout=10) is False  # refused directly; the proxy was not asked
    assert fake_proxy.seen == []
    monkeypatch.setenv("HF_ENDPOINT", fake_proxy.url)  # the server itself as the hub, reached directly
    assert _hub_reachable(timeout=10) is True
    assert fake_proxy.seen == ["HEAD / HTTP/1.1"]


def test_the_user_cache_folder_follows_xdg_without_clipdex_cache(tmp_path, monkeypatch):
    from retrieval.embedding.spec import cache_dir

    monkeypatch.delenv("CLIPDEX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "clipdex"
    monkeypatch.setenv("CLIPDEX_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
