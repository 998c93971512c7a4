"""OpenAI's CLIP weights fetched on first use (model/clip/download.py), against a local HTTP server.

The server (127.0.0.1, a thread) serves a small file under an OpenAI-style URL (the file's
SHA-256 as the second-to-last path segment), answers Range requests, records every request and
misbehaves on demand: it cuts transfers off half-way, answers an HTTP error, ignores ranges or
waits before the body. The URL table and the cache folder are overridden per test.
"""
import hashlib
import http.server
import os
import random
import re
import socket
import threading
import time

import pytest
import torch

from config import load_config
from model.clip import download, loader
from model.make_model import build_clip
from utils.errors import ConfigError, UserError

NAME = "ViT-B-16"


class _Server:
    """``files`` ({URL path: bytes}) over HTTP/1.1 with Range support; ``requests`` lists (path, Range)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut = 0              # the next `cut` answers stop after half their body and close the connection
        self.status = 0           # answer every request with this HTTP error
        self.ignore_range = False
        self.delay = 0.0          # seconds before each body
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if server.status or data is None:
                    self.send_error(server.status or 404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                time.sleep(server.delay)
                if server.cut:
                    server.cut -= 1
                    self.wfile.write(body[:len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # a short poll: shutdown() waits up to one poll interval (0.5 s by default, per test)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache folder of this test; downloads allowed, no progress bar, short time-outs, small chunks."""
    folder = tmp_path / "cache"
    monkeypatch.setattr(loader, "CLIP_CACHE_DIR", folder)
    monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
    monkeypatch.setenv("SVLLREID_PROGRESS", "off")
    monkeypatch.setattr(download, "TIMEOUT_S", 5)
    monkeypatch.setattr(download, "_CHUNK", 1 << 16)
    return folder


def _serve(server, monkeypatch, data: bytes, sha: str | None = None) -> str:
    """Serve ``data`` as OpenAI's ViT-B-16 file under a URL naming ``sha`` (default: its own SHA-256)."""
    sha = sha or hashlib.sha256(data).hexdigest()
    path = f"/clip/models/{sha}/{NAME}.pt"
    server.files[path] = data
    url = server.url(path)
    monkeypatch.setitem(download.OPENAI_URLS, NAME, url)
    return url


@pytest.fixture
def data(server, cache, monkeypatch) -> bytes:
    """300 kB of random bytes served under their checksum."""
    content = random.Random(0).randbytes(300_000)
    _serve(server, monkeypatch, content)
    return content


def _one_line(err: pytest.ExceptionInfo, *names: object) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for n in names:
        assert str(n) in msg, (n, msg)
    return msg


def _files(folder) -> set[str]:
    return set(os.listdir(folder)) - {f".{NAME}.pt.lock"} if folder.exists() else set()


# ------------------------------------------------------------------------------- good transfers
def test_first_use_downloads_verifies_and_caches_then_never_again(data, server, cache):
    path = loader.resolve_checkpoint(NAME)
    assert path == cache / f"{NAME}.pt" and path.read_bytes() == data
    assert _files(cache) == {f"{NAME}.pt"}                  # no .part, no temporary file left
    assert len(server.requests) == 1 and server.requests[0][1] is None
    assert loader.resolve_checkpoint(NAME) == path          # a second load, and OpenAI's own spelling
    assert loader.resolve_checkpoint("ViT-B/16") == path
    assert len(server.requests) == 1


def test_build_clip_downloads_only_without_pretrain_path(server, cache, monkeypatch):
    """MODEL.PRETRAIN_PATH empty: OpenAI's weights for MODEL.NAME come from the (stand-in) server and load.
    MODEL.PRETRAIN_PATH set, even to the model name: nothing is downloaded."""
    torch.manual_seed(0)
    from model import clip
    tiny = clip.build_random_clip(NAME, 14, 14, 16, embed_dim=64, vision_width=64, vision_layers=1,
                                  text_width=64, text_heads=1, text_layers=1)
    torch.save(tiny.state_dict(), cache.parent / "tiny.pt")
    _serve(server, monkeypatch, (cache.parent / "tiny.pt").read_bytes())
    opts = ["MODEL.CLIP_INIT", "pretrained", "INPUT.SIZE_TRAIN", "[224, 224]", "MODEL.STRIDE_SIZE", "[16, 16]"]
    with pytest.raises(FileNotFoundError) as err:
        build_clip(load_config("", [*opts, "MODEL.PRETRAIN_PATH", NAME]))
    _one_line(err, cache / f"{NAME}.pt", "MODEL.PRETRAIN_PATH", download.OPENAI_URLS[NAME])
    assert server.requests == []
    model = build_clip(load_config("", opts))
    assert len(server.requests) == 1
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in tiny.state_dict().items())


def test_cut_off_transfer_is_resumed_with_a_range_request(data, server, cache):
    server.cut = 1
    path = loader.resolve_checkpoint(NAME)
    assert path.read_bytes() == data and _files(cache) == {f"{NAME}.pt"}
    half = len(data) // 2
    assert [r[1] for r in server.requests] == [None, f"bytes={half}-"]


def test_broken_off_every_time_keeps_the_part_and_the_next_run_resumes(data, server, cache):
    server.cut = download.ATTEMPTS
    with pytest.raises(UserError) as err:
        loader.resolve_checkpoint(NAME)
    part = cache / f"{NAME}.pt.part"
    _one_line(err, f"broke off {download.ATTEMPTS} times", part, "resumes", "curl")
    received = part.stat().st_size
    assert 0 < received < len(data) and data.startswith(part.read_bytes())
    assert not (cache / f"{NAME}.pt").exists()
    assert loader.resolve_checkpoint(NAME).read_bytes() == data
    assert server.requests[-1][1] == f"bytes={received}-" and _files(cache) == {f"{NAME}.pt"}


def test_a_server_that_ignores_the_range_gives_the_whole_file_again(data, server, cache):
    cache.mkdir()
    (cache / f"{NAME}.pt.part").write_bytes(b"stale bytes of another attempt")
    server.ignore_range = True
    assert loader.resolve_checkpoint(NAME).read_bytes() == data
    assert server.requests[0][1] == "bytes=30-"


def test_a_wrong_cached_file_is_downloaded_again(data, server, cache):
    cache.mkdir()
    (cache / f"{NAME}.pt").write_bytes(data[:1000])           # e.g. a copy by hand that broke off
    assert loader.resolve_checkpoint(NAME).read_bytes() == data
    assert len(server.requests) == 1


def test_two_processes_download_once(data, server, cache):
    """The second waits for the first's lock and then finds the verified file."""
    server.delay = 0.5
    results = []
    threads = [threading.Thread(target=lambda: results.append(loader.resolve_checkpoint(NAME))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all(p.read_bytes() == data for p in results)
    assert len(server.requests) == 1


def test_progress_bar_only_when_progress_is_on(data, cache, capsys, monkeypatch):
    loader.resolve_checkpoint(NAME)
    assert capsys.readouterr().err == ""
    (cache / f"{NAME}.pt").unlink()
    monkeypatch.setenv("SVLLREID_PROGRESS", "on")
    loader.resolve_checkpoint(NAME)
    assert f"{NAME}.pt" in capsys.readouterr().err


# ------------------------------------------------------------------------------- failures: one line each
def test_wrong_checksum_deletes_the_file(server, cache, monkeypatch):
    content = b"x" * 5000
    wrong = hashlib.sha256(b"something else").hexdigest()
    url = _serve(server, monkeypatch, content, sha=wrong)
    with pytest.raises(UserError) as err:
        loader.resolve_checkpoint(NAME)
    _one_line(err, url, wrong, hashlib.sha256(content).hexdigest(), "deleted")
    assert _files(cache) == set()


@pytest.mark.parametrize("status", [500, 404])
def test_server_error_is_one_line(data, server, cache, status):
    server.status = status
    with pytest.raises(UserError) as err:
        loader.resolve_checkpoint(NAME)
    _one_line(err, f"HTTP {status}", download.OPENAI_URLS[NAME], "curl -fL", cache / f"{NAME}.pt")
    assert _files(cache) == set()


def test_no_network_is_one_line(cache, monkeypatch):
    with socket.socket() as s:                  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sha = hashlib.sha256(b"weights").hexdigest()
    url = f"http://127.0.0.1:{port}/clip/models/{sha}/{NAME}.pt"
    monkeypatch.setitem(download.OPENAI_URLS, NAME, url)
    with pytest.raises(UserError) as err:
        loader.resolve_checkpoint(NAME)
    _one_line(err, url, "refused", sha, "curl -fL", cache / f"{NAME}.pt")
    assert _files(cache) == set()


def test_offline_gives_the_url_path_checksum_and_the_copy_by_hand(data, server, cache, monkeypatch):
    monkeypatch.setenv(download.OFFLINE_ENV, "1")
    url = download.OPENAI_URLS[NAME]
    with pytest.raises(FileNotFoundError) as err:
        loader.resolve_checkpoint(NAME)
    _one_line(err, download.OFFLINE_ENV, url, cache / f"{NAME}.pt", download.expected_sha256(url),
              f"curl -fL -o {NAME}.pt {url}", "sha256sum")
    cache.mkdir()
    (cache / f"{NAME}.pt").write_bytes(b"not the weights")     # a wrong file is named, and kept
    with pytest.raises(UserError) as err:
        loader.resolve_checkpoint(NAME)
    _one_line(err, download.OFFLINE_ENV, hashlib.sha256(b"not the weights").hexdigest(), url)
    assert (cache / f"{NAME}.pt").read_bytes() == b"not the weights"
    assert server.requests == []
    (cache / f"{NAME}.pt").write_bytes(data)                     # the right file is used offline
    assert loader.resolve_checkpoint(NAME).read_bytes() == data
    monkeypatch.setenv(download.OFFLINE_ENV, "maybe")
    with pytest.raises(ConfigError, match=download.OFFLINE_ENV):
        download.offline()


@pytest.mark.slow
def test_offline_training_without_weights_is_one_error_line(tiny_root, cache, monkeypatch, capsys, tmp_path):
    import train_svllreid
    from tests.helpers import one_line_error, train_argv
    monkeypatch.setenv(download.OFFLINE_ENV, "1")
    argv = train_argv(tiny_root, tmp_path / "run", "MODEL.CLIP_INIT", "pretrained")
    assert train_svllreid.main(argv) == 2
    one_line_error(capsys, download.OPENAI_URLS[NAME], cache / f"{NAME}.pt", "curl")
