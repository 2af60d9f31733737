"""Published weights: the table against timm's records, downloads from a real HTTP server on 127.0.0.1 in the hub's
URL layout and a plain release URL (cache hits, a resumed download, tampered files refused and not cached, offline
and manual sources named in one line), and the preprocessing each set of weights was evaluated with.

The files served are made here in each source's format (timm state dicts as safetensors, the official EfficientViT
``.pth``, Hugging Face transformers' SwiftFormer ``pytorch_model.bin``) from randomised, BN-calibrated reference
models; nothing leaves 127.0.0.1 (``no_network`` fails a test that tries)."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import re
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as safetensors_bytes

import edgevits
from edgevits.checkpoint import weights as weights_mod
from edgevits.checkpoint.hub import DownloadError, hf_download, url_download
from edgevits.checkpoint.preprocess import DataConfig, transforms
from edgevits.testing import assert_parity, float64_reference, import_timm

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_LOCAL = ("127.0.0.1", "localhost", "::1")


# ---- a server in the hub's URL layout, and a GitHub-style release URL ---------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    """``HEAD/GET /{repo}/resolve/{rev}/{file}`` (200 with the hub's headers; GET redirects to ``/lfs/{sha256}``),
    ``GET /lfs/{sha256}``, ``GET /releases/download/{tag}/{file}`` (302 to ``/assets/{file}``, as GitHub does) and
    ``GET /assets/{file}`` with Range requests (206)."""

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool):
        srv = self.server
        path = urllib.parse.unquote(self.path)
        srv.log.append((self.command, path, self.headers.get("Range")))
        m = re.match(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", path)
        if m and (m["repo"], m["file"]) in srv.hub:
            data = srv.hub[(m["repo"], m["file"])]
            sha = hashlib.sha256(data).hexdigest()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                       "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}
            if head:
                return self._send(200, {**headers, "Content-Length": str(len(data))}, b"", head=True)
            return self._send(302, {**headers, "Location": f"/lfs/{sha}", "Content-Length": "0"}, b"")
        if path.startswith("/lfs/"):
            data = next((d for d in srv.hub.values() if hashlib.sha256(d).hexdigest() == path[5:]), None)
            if data is not None:
                body = bytes([data[0] ^ 0xFF]) + data[1:] if srv.tamper else data  # same size, other bytes
                return self._send(200, {"Content-Length": str(len(body))}, body, head=head)
        m = re.match(r"^/releases/download/[^/]+/(?P<file>[^/]+)$", path)
        if m and m["file"] in srv.assets:
            return self._send(302, {"Location": f"/assets/{m['file']}", "Content-Length": "0"}, b"")
        if path.startswith("/assets/") and path[8:] in srv.assets:
            return self._asset(srv.assets[path[8:]], head)
        self._send(404, {"Content-Length": "0", "X-Repo-Commit": COMMIT}, b"")

    def _asset(self, data: bytes, head: bool):
        srv = self.server
        start = int(re.match(r"bytes=(\d+)-", self.headers["Range"])[1]) if self.headers.get("Range") else 0
        body, status = data[start:], 206 if start else 200
        headers = {"Content-Length": str(len(body)), "ETag": '"v1"', "Accept-Ranges": "bytes"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        srv.statuses.append(status)
        if srv.cut_once and not head:  # the connection breaks after this many bytes
            body, srv.cut_once = body[:srv.cut_once], None
        self._send(status, headers, body, head=head)

    def _send(self, status: int, headers: dict, body: bytes, head: bool = False):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub: dict[tuple[str, str], bytes] = {}
        self.assets: dict[str, bytes] = {}
        self.log: list[tuple] = []
        self.statuses: list[int] = []
        self.tamper = False
        self.cut_once: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, prefix: str) -> int:
        return sum(1 for method, path, _ in self.log if method == "GET" and path.startswith(prefix))


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything resolves or connects to a host other than 127.0.0.1."""
    tried = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in _LOCAL:
            tried.append(host)
            raise OSError(f"test: no network beyond 127.0.0.1 ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in _LOCAL:
            tried.append(address[0])
            raise OSError(f"test: no network beyond 127.0.0.1 ({address[0]})")
        return real_connect(self, address)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield
    assert not tried, f"the test tried to reach {tried}"


@pytest.fixture
def server(no_network, monkeypatch, tmp_path):
    """A ``HubServer`` that ``HF_ENDPOINT`` points at, with huggingface_hub's and edgevits' caches in ``tmp_path``
    (telemetry off: huggingface_hub would otherwise look up its agent registry on huggingface.co)."""
    from huggingface_hub import constants
    srv = HubServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("EDGEVITS_CACHE", str(tmp_path / "edgevits"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    yield srv
    srv.shutdown()
    srv.server_close()


def _check(ours, ref, x):
    with torch.no_grad():
        assert_parity(ours(x), ref(x), float64_reference(ref, x))


def _timm_file(ref) -> bytes:
    return safetensors_bytes({k: v.contiguous() for k, v in ref.state_dict().items()})


def _official_efficientvit(ref) -> bytes:
    """The official EfficientViT release layout of timm's weights (the inverse map tests/models uses)."""
    spec = importlib.util.spec_from_file_location(
        "_evit_tests", Path(__file__).parents[1] / "models" / "test_efficientvit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    buf = io.BytesIO()
    torch.save({"model": module._to_official(ref.state_dict())}, buf)
    return buf.getvalue()


def _point_release_at(monkeypatch, server, model: str, **changes) -> None:
    """The table with ``model``'s official release URL on ``server`` (and ``changes`` to that entry)."""
    table = dict(weights_mod.weights_table())
    table[model] = [dataclasses.replace(s, url=f"{server.url}/releases/download/v1.0/{s.file_name}", **changes)
                    if s.tag == "official" else s for s in table[model]]
    monkeypatch.setattr(weights_mod, "weights_table", lambda: table)


# ---- the table -----------------------------------------------------------------------------------------------------

def test_every_variant_defaults_to_timms_hub_repo_with_timms_preprocessing():
    timm = import_timm()
    for name in edgevits.list_models():
        entry = edgevits.get_entry(name)
        src = edgevits.get_weights(name)
        assert src.default and src.source == "timm" and src.kind == "hub" and src.filename == "model.safetensors"
        cfg = timm.models.get_pretrained_cfg(f"{entry.timm_name}.{src.tag}")
        assert cfg.hf_hub_id == src.repo_id == f"timm/{entry.timm_name}.{src.tag}"
        pre = src.preprocess
        assert (pre.crop_pct, pre.interpolation, pre.mean, pre.std, pre.input_size) == (
            cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std, cfg.input_size), name
        assert src.top1 == entry.published["top1"]
        official = edgevits.get_weights(name, "official")
        assert official.preprocess.crop_pct == 0.875 and official.kind in ("url", "manual")
        for s in edgevits.list_weights(name):
            assert s.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", s.sha256)
    assert edgevits.data_config("efficientformer_l1").crop_pct == 0.95  # timm's; the official code's is 0.875
    assert edgevits.data_config("efficientvit_m3").crop_pct == 0.875


def test_the_table_records_the_attention_revision_and_the_release_files():
    revisions = {s.tag: s.attention_revision for s in edgevits.list_weights("swiftformer_l1")}
    assert revisions == {"dist_in1k": "current", "official": "current", "transformers": "legacy"}
    assert edgevits.get_weights("swiftformer_l1", "transformers").repo_id == "MBZUAI/swiftformer-l1"
    official = edgevits.get_weights("efficientvit_m5", "official")
    assert official.url.endswith("/EfficientViT_Model_Zoo/releases/download/v1.0/efficientvit_m5.pth")
    assert official.top1 == 77.1
    assert edgevits.get_weights("efficientformerv2_s2", "official").file_name == "eformer_s2_450.pth"
    with pytest.raises(edgevits.ConfigError, match="official"):
        edgevits.create_model("efficientvit_m0", pretrained="nope")
    with pytest.raises(edgevits.ConfigError, match="not both"):
        edgevits.create_model("efficientvit_m0", pretrained=True, checkpoint="x.pth")


# ---- downloads -----------------------------------------------------------------------------------------------------

def test_hub_weights_download_once_load_through_the_timm_converter_and_match_timm(server, timm_reference):
    ref = timm_reference("efficientvit_m0")
    server.hub[("timm/efficientvit_m0.r224_in1k", "model.safetensors")] = _timm_file(ref)
    ours = edgevits.create_model("efficientvit_m0", pretrained=True).eval()
    _check(ours, ref, torch.randn(2, 3, 224, 224))
    assert server.gets("/lfs/") == 1
    assert ours.pretrained_tag == "r224_in1k" and ours.class_names[:2] == ["tench", "goldfish"]
    assert edgevits.data_config(ours).crop_pct == 0.875
    again = edgevits.create_model("efficientvit_m0", pretrained="r224_in1k", img_size=160)
    assert server.gets("/lfs/") == 1  # the second call is a cache hit
    assert edgevits.data_config(again).img_size == (160, 160)


def test_a_tampered_hub_file_is_refused_removed_and_fetched_again(server, timm_reference, tmp_path):
    data = _timm_file(timm_reference("efficientvit_m0"))
    server.hub[("timm/efficientvit_m0.r224_in1k", "model.safetensors")] = data
    server.tamper = True
    with pytest.raises(edgevits.CheckpointError, match="sha256 the hub announced"):
        edgevits.create_model("efficientvit_m0", pretrained=True)
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and p.stat().st_size == len(data)]
    server.tamper = False
    edgevits.create_model("efficientvit_m0", pretrained=True)
    assert server.gets("/lfs/") == 2  # not served from the cache: downloaded again
    with pytest.raises(DownloadError, match="pinned sha256"):  # a pinned hash is checked too
        hf_download("timm/efficientvit_m0.r224_in1k", "model.safetensors", sha256="0" * 64)


def test_release_url_redirects_resumes_a_cut_download_and_matches_timm(server, monkeypatch, timm_reference, tmp_path):
    ref = timm_reference("efficientvit_m0")
    data = _official_efficientvit(ref)
    server.assets["efficientvit_m0.pth"] = data
    server.cut_once = len(data) // 3
    _point_release_at(monkeypatch, server, "efficientvit_m0")
    with pytest.raises(edgevits.CheckpointError, match="next call resumes"):
        edgevits.create_model("efficientvit_m0", pretrained="official")
    part = tmp_path / "edgevits" / "weights" / "efficientvit_m0.pth.part"
    assert part.stat().st_size == len(data) // 3
    ours = edgevits.create_model("efficientvit_m0", pretrained="official").eval()
    assert server.statuses == [200, 206] and server.log[-1][2] == f"bytes={len(data) // 3}-"
    assert (tmp_path / "edgevits" / "weights" / "efficientvit_m0.pth").read_bytes() == data and not part.exists()
    _check(ours, ref, torch.randn(2, 3, 224, 224))
    requests = len(server.log)
    edgevits.create_model("efficientvit_m0", pretrained="official")
    assert len(server.log) == requests  # found in the cache: no request at all


def test_a_file_that_differs_from_its_pinned_hash_is_refused_and_not_kept(server, monkeypatch, tmp_path):
    server.assets["efficientvit_m0.pth"] = b"not the published file"
    _point_release_at(monkeypatch, server, "efficientvit_m0", sha256="0" * 64)
    with pytest.raises(edgevits.CheckpointError, match="pinned sha256"):
        edgevits.create_model("efficientvit_m0", pretrained="official")
    assert not list((tmp_path / "edgevits" / "weights").iterdir())
    url = f"{server.url}/releases/download/v1.0/efficientvit_m0.pth"
    got = []
    path = url_download(url, tmp_path / "x.pth", progress=lambda done, total, name: got.append((done, total)))
    assert path.read_bytes() == b"not the published file" and got[-1] == (22, 22)


def test_offline_says_where_to_put_the_file_and_a_file_put_there_is_used(server, monkeypatch, timm_reference,
                                                                         tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(edgevits.CheckpointError) as info:
        edgevits.create_model("efficientvit_m0", pretrained=True)
    message = str(info.value)
    drop_in = tmp_path / "edgevits" / "weights"
    assert f"{server.url}/timm/efficientvit_m0.r224_in1k/resolve/main/model.safetensors" in message
    assert "offline" in message and str(drop_in / "efficientvit_m0.r224_in1k.safetensors") in message
    assert not server.log
    ref = timm_reference("efficientvit_m0")
    (drop_in / "efficientvit_m0.r224_in1k.safetensors").write_bytes(_timm_file(ref))
    _check(edgevits.create_model("efficientvit_m0", pretrained=True).eval(), ref, torch.randn(2, 3, 224, 224))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/efficientvit_m0.pth"
    with pytest.raises(DownloadError, match=re.escape(closed)):
        url_download(closed, tmp_path / "y.pth")


def test_manual_sources_name_the_page_the_file_and_the_folder(server, tmp_path):
    with pytest.raises(edgevits.CheckpointError) as info:
        edgevits.create_model("swiftformer_xs", pretrained="official")
    assert all(s in str(info.value) for s in ("SwiftFormer_XS_ckpt.pth", "github.com/Amshaker/SwiftFormer",
                                              str(tmp_path / "edgevits" / "weights")))
    torch.save({"model": edgevits.create_model("swiftformer_xs").state_dict()},
               tmp_path / "edgevits" / "weights" / "SwiftFormer_XS_ckpt.pth")
    model = edgevits.create_model("swiftformer_xs", pretrained="official")
    assert model.pretrained_tag == "official" and model.data_config.crop_pct == 0.875
    assert not server.log


def test_transformers_swiftformer_weights_select_the_legacy_revision(server):
    from transformers import SwiftFormerConfig, SwiftFormerForImageClassification

    from edgevits.testing import calibrated
    cfg = edgevits.get_entry("swiftformer_xs").config
    hf = calibrated(SwiftFormerForImageClassification(SwiftFormerConfig(
        embed_dims=list(cfg.embed_dims), depths=list(cfg.depths), num_labels=1000)), batches=1, batch_size=4, size=96)
    buf = io.BytesIO()
    torch.save(hf.state_dict(), buf)
    server.hub[("MBZUAI/swiftformer-xs", "pytorch_model.bin")] = buf.getvalue()
    ours = edgevits.create_model("swiftformer_xs", pretrained="transformers").eval()
    assert ours.config.attention_revision == "legacy"
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = hf(x).logits
        ref64 = hf.double()(x.double()).logits
        assert_parity(ours(x), ref, ref64)
    with pytest.raises(edgevits.ConfigError, match="legacy"):
        edgevits.create_model("swiftformer_xs", pretrained="transformers", attention_revision="current")


# ---- preprocessing -------------------------------------------------------------------------------------------------

def test_the_evaluation_transform_resizes_the_shorter_side_and_crops_the_centre_as_torchvision():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    config = edgevits.data_config("efficientvit_m0", tag="official")
    x = transforms(config)(img)
    # Resize(256): 300x400 -> 256x341 (longer side truncated); CenterCrop(224): offsets round(16.0), round(58.5)
    expected = img.resize((341, 256), Image.BICUBIC).crop((58, 16, 282, 240))
    arr = (np.asarray(expected, dtype=np.float32) / 255 - np.array(config.mean)) / np.array(config.std)
    np.testing.assert_allclose(x.numpy(), arr.transpose(2, 0, 1), atol=1e-5)
    x95 = transforms(edgevits.data_config("efficientformer_l1"))(img)  # resize 235 (224 / 0.95), crop 224
    assert x95.shape == (3, 224, 224) and not torch.allclose(x95, x)
    train = transforms(config.with_size(64), train=True)
    a, b = train(img, np.random.default_rng(1)), train(img, np.random.default_rng(1))
    assert a.shape == (3, 64, 64) and torch.equal(a, b)
    assert DataConfig.from_dict(config.to_dict()) == config
    for bad in ({"crop_pct": 0}, {"interpolation": "cubic"}, {"std": (1, 1)}):
        with pytest.raises(edgevits.ConfigError):
            DataConfig(**bad)
