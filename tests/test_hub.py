"""Hub upload and load-by-id against a minimal local Hub started by the test.

`FakeHub` implements, over real HTTP on 127.0.0.1, just the endpoints huggingface_hub uses for
`create_repo`, `upload_folder` (preupload answers "regular" for every file, so contents travel base64-encoded
in the commit call and no LFS/Xet storage is involved) and `snapshot_download` / `hf_hub_download`
(repo info, tree listing, resolve). Repos live in memory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from helpers import LocalServer, make_tiny_base, randomize_, save_tiny_model

REPO = Path(__file__).resolve().parents[1]


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub(LocalServer):
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"files": {path: bytes}, "sha": str, "private": bool}
        self.calls: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None,
                      ctype="application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, code: int, obj, headers: dict | None = None):
                self._send(code, json.dumps(obj).encode(), headers)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, code: int, kind: str, msg: str):
                self._json(code, {"error": msg}, {"X-Error-Code": kind, "X-Error-Message": msg})

            def do_POST(self):
                path = urlparse(self.path).path
                hub.calls.append(("POST", path))
                body = self._body()
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = (f"{req['organization']}/{req['name']}" if req.get("organization")
                               else req["name"])
                    url = f"{hub.url}/{repo_id}"
                    if repo_id in hub.repos:
                        return self._json(409, {"error": "You already created this model repo", "url": url})
                    hub.repos[repo_id] = {"files": {}, "sha": "0" * 40,
                                          "private": (req.get("visibility") == "private"
                                                      or bool(req.get("private")))}
                    return self._json(200, {"url": url, "name": repo_id})
                parts = path.split("/")  # /api/models/{ns}/{name}/{preupload|commit}/{rev}
                if len(parts) == 7 and parts[1:3] == ["api", "models"]:
                    repo_id = f"{parts[3]}/{parts[4]}"
                    if repo_id not in hub.repos:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    repo = hub.repos[repo_id]
                    if parts[5] == "preupload":
                        files = json.loads(body)["files"]
                        return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                           "shouldIgnore": False, "oid": None}
                                                          for f in files]})
                    if parts[5] == "commit":
                        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                        for item in lines:
                            if item["key"] == "file":
                                repo["files"][item["value"]["path"]] = base64.b64decode(
                                    item["value"]["content"])
                            elif item["key"] != "header":
                                return self._json(400, {"error": f"unsupported commit item {item['key']}"})
                        repo["sha"] = hashlib.sha1(json.dumps(sorted(
                            (p, git_blob_oid(d)) for p, d in repo["files"].items())).encode()).hexdigest()
                        return self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{repo['sha']}",
                                                "commitOid": repo["sha"], "success": True})
                self._error(404, "EntryNotFound", f"no route {path}")

            def do_GET(self):
                self._get()

            def do_HEAD(self):
                self._get()

            def _get(self):
                path = unquote(urlparse(self.path).path)
                hub.calls.append((self.command, path))
                parts = path.split("/")
                if parts[1:3] == ["api", "models"] and len(parts) >= 5:
                    repo_id = f"{parts[3]}/{parts[4]}"
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    if len(parts) == 5 or parts[5] == "revision":  # model_info / repo_info
                        return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": repo["sha"],
                                                "private": repo["private"],
                                                "siblings": [{"rfilename": p}
                                                             for p in sorted(repo["files"])]})
                    if parts[5] == "tree":  # list_repo_tree (flat repos only)
                        return self._json(200, [{"type": "file", "path": p, "size": len(d),
                                                 "oid": git_blob_oid(d)}
                                                for p, d in sorted(repo["files"].items())])
                # /{ns}/{name}/resolve/{rev}/{file}
                if len(parts) >= 6 and parts[3] == "resolve":
                    repo = hub.repos.get(f"{parts[1]}/{parts[2]}")
                    if repo is None:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    name = "/".join(parts[5:])
                    if name not in repo["files"]:
                        return self._error(404, "EntryNotFound", "Entry not found")
                    data = repo["files"][name]
                    return self._send(200, data,
                                      {"X-Repo-Commit": repo["sha"], "ETag": f'"{git_blob_oid(data)}"'},
                                      ctype="application/octet-stream")
                self._error(404, "EntryNotFound", f"no route {path}")

        super().__init__(Handler)


def save_heads(base, root: Path, base_path: str, **cfg) -> Path:
    from hydra.model import HydraConfig, HydraModel

    model = HydraModel(base, HydraConfig(base_model_name_or_path=base_path, **cfg))
    randomize_(model.heads, seed=3, scale=0.2)
    model.save_pretrained(root)
    return root


@pytest.fixture
def hub():
    with FakeHub() as h:
        yield h


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    """Point huggingface_hub (already imported) at the fake Hub, with an empty cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    return hub


def test_upload_then_load_by_repo_id(hub_env, tmp_path):
    from safetensors.torch import load_file

    from hydra.hf_utils import main
    from hydra.model import HydraModel

    base = make_tiny_base()
    heads = save_heads(base, tmp_path / "heads", "some/base-model", hydra_num_heads=3,
                       hydra_head_arch="prefix-mlp")
    assert main(["--folder", str(heads), "--repo", "me/tiny-heads", "--endpoint", hub_env.url,
                 "--private"]) == 0
    repo = hub_env.repos["me/tiny-heads"]
    assert repo["private"] is True
    assert repo["files"]["config.json"] == (heads / "config.json").read_bytes()
    assert repo["files"]["model.safetensors"] == (heads / "model.safetensors").read_bytes()
    # Uploading again (repo exists) is fine.
    assert main(["--folder", str(heads), "--repo", "me/tiny-heads", "--endpoint", hub_env.url]) == 0

    loaded = HydraModel.from_pretrained("me/tiny-heads", base_model=base)
    assert loaded.config.hydra_head_arch == "prefix-mlp" and loaded.config.hydra_num_heads == 3
    assert loaded.config.base_model_name_or_path == "some/base-model"
    saved = load_file(str(heads / "model.safetensors"))
    for k, v in loaded.heads.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert any(path.startswith("/me/tiny-heads/resolve/") for _, path in hub_env.calls)

    with pytest.raises(FileNotFoundError, match="could not find heads 'me/missing'"):
        HydraModel.from_pretrained("me/missing", base_model=base)


def test_cli_chats_with_heads_loaded_by_hub_id(hub, tmp_path):
    """End to end in a fresh process: upload with the CLI, then `hydra.inference.cli --model USER/NAME`, whose
    config names the base model folder; huggingface_hub is pointed at the fake Hub by HF_ENDPOINT."""
    save_tiny_model(tmp_path, heads=dict(num_heads=4, seed=3, scale=0.2))
    heads = tmp_path / "heads"
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN="hf_fake",
               HF_HUB_OFFLINE="0", TOKENIZERS_PARALLELISM="false")
    up = subprocess.run([sys.executable, "-m", "hydra.hf_utils", "--folder", str(heads),
                         "--repo", "me/chat-heads"],
                        check=False, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=300)
    assert up.returncode == 0, up.stderr
    assert "HydraModel.from_pretrained('me/chat-heads')" in up.stdout
    chat = subprocess.run([sys.executable, "-m", "hydra.inference.cli", "--model", "me/chat-heads",
                           "--device", "cpu", "--max-new-tokens", "5", "--stats", "--tree", "chain_4"],
                          input="Hello\n", check=False, capture_output=True, text=True, env=env,
                          cwd=str(REPO), timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "4 hydra-mlp heads, tree chain_4" in chat.stdout and "[stats] 5 tokens" in chat.stdout


@pytest.mark.parametrize("breakage, message", [
    ("no_folder", "is not a folder"),
    ("no_config", "has no config.json"),
    ("bad_json", "is not valid JSON"),
    ("not_hydra", "is not a Hydra heads config"),
    ("no_weights", "has no model.safetensors"),
    ("bad_weights", "is not a readable safetensors file"),
    ("wrong_heads", "config.json says 5 heads"),
])
def test_upload_validates_the_folder_before_any_network_call(hub, tmp_path, breakage, message, capsys):
    from hydra.hf_utils import main

    heads = save_heads(make_tiny_base(), tmp_path / "heads", "some/base", hydra_num_heads=2)
    cfg = json.loads((heads / "config.json").read_text())
    if breakage == "no_folder":
        heads = tmp_path / "nothing"
    elif breakage == "no_config":
        (heads / "config.json").unlink()
    elif breakage == "bad_json":
        (heads / "config.json").write_text("{oops")
    elif breakage == "not_hydra":
        (heads / "config.json").write_text(json.dumps({"model_type": "llama"}))
    elif breakage == "no_weights":
        (heads / "model.safetensors").unlink()
    elif breakage == "bad_weights":
        (heads / "model.safetensors").write_bytes(b"not safetensors")
    elif breakage == "wrong_heads":
        (heads / "config.json").write_text(json.dumps(dict(cfg, hydra_num_heads=5)))
    assert main(["--folder", str(heads), "--repo", "me/x", "--endpoint", hub.url]) == 1
    assert message in capsys.readouterr().err
    assert hub.calls == []


def test_upload_reports_hub_errors(tmp_path, capsys):
    from hydra.hf_utils import main

    heads = save_heads(make_tiny_base(), tmp_path / "heads", "some/base", hydra_num_heads=2)
    with FakeHub() as dead:
        url = dead.url
    assert main(["--folder", str(heads), "--repo", "me/x", "--endpoint", url]) == 1
    assert "upload failed" in capsys.readouterr().err


def test_help_mentions_both_commands():
    r = subprocess.run([sys.executable, "-m", "hydra.hf_utils", "-h"], check=False, capture_output=True,
                       text=True, cwd=str(REPO), timeout=120)
    assert (r.returncode == 0 and "--folder" in r.stdout and "--private" in r.stdout
            and "export-medusa" in r.stdout)
