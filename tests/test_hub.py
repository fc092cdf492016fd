"""Pushing to the Hub, against a local HTTP server that stands in for the Hub API and records every upload."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_llama, token_batch
from datasets import Dataset
from huggingface_hub import constants
from transformers import Trainer, TrainingArguments

from hf_fedkseed import delta as delta_module
from hf_fedkseed import hub
from hf_fedkseed.artifacts import KSeedArtifactsCallback
from hf_fedkseed.cli import main
from hf_fedkseed.delta import apply_kseed, base_weights_sha256, save_kseed_delta
from hf_fedkseed.model_card import write_model_card
from hf_fedkseed.optimizer import KSeedZOOptimizer

TOKEN = "hf_test_write_token"
SUMMARY = {"method": "fedkseed", "base_model": "tiny-llama (tests)", "base_model_source": "config", "num_seeds": 16}


class FakeHub(ThreadingHTTPServer):
    """The Hub API endpoints that `create_repo`, `upload_folder` and `hf_hub_download` call, and nothing more.

    Small files go through the regular (non-LFS) path: preupload answers `regular` for every file, so the commit
    carries them base64-encoded in its NDJSON body, which the server decodes and records.
    """

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}}
        self.created: list[dict] = []
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files": {path: bytes}}
        self.requests: list[tuple[str, str]] = []
        self.fail_commits = False  # then commits get a 403 (a 5xx would be retried with backoff for ~20 s)


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _reply(self, status: int, body: dict | bytes | None = None, headers: dict | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(body, bytes) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_POST(self):
        self.server.requests.append(("POST", self.path))
        body = self._body()
        if self.path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if self.headers.get("authorization") != f"Bearer {TOKEN}":
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            self.server.created.append(payload)
            if repo_id in self.server.repos:
                return self._reply(409, {"error": "You already created this model repo", "url": repo_id})
            self.server.repos[repo_id] = {"private": payload.get("visibility") == "private", "files": {}}
            return self._reply(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/?]+)(\?.*)?", self.path)
        if match is None or match[1] not in self.server.repos:
            return self._reply(404, {"error": "Repository not found"})
        repo_id, action, revision = match[1], match[2], match[3]
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._reply(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if self.server.fail_commits:
            return self._reply(403, {"error": "Storage quota exceeded for namespace me"})
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {
            line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"
        }
        self.server.commits.append(
            {"repo": repo_id, "revision": revision, "summary": header["summary"], "files": files}
        )
        self.server.repos[repo_id]["files"].update(files)
        oid = hashlib.sha1(body).hexdigest()
        return self._reply(200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{oid}", "commitOid": oid})

    def do_GET(self):
        self.server.requests.append((self.command, self.path))
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
        repo = self.server.repos.get(match[1]) if match else None
        if repo is None or match[3] not in repo["files"]:
            return self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        data = repo["files"][match[3]]
        etag = hashlib.sha1(data).hexdigest()
        return self._reply(200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": "0" * 40})

    do_HEAD = do_GET


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # What HF_ENDPOINT does when set before huggingface_hub is imported.
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    import transformers.utils.hub

    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # the Trainer's shared HfApi, rebuilt on our endpoint
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def output_dir(tmp_path):
    """An output directory as a run leaves it: merged model, delta, card, records and a checkpoint."""
    out = tmp_path / "run"
    model = tiny_llama()
    base_hash = base_weights_sha256(model)
    optimizer = KSeedZOOptimizer(model, lr=1e-2, eps=1e-3, num_seeds=16, seed=1)
    batch = token_batch()
    for _ in range(3):
        optimizer.step(lambda: model(input_ids=batch, labels=batch).loss)
    model.save_pretrained(out)
    save_kseed_delta(optimizer, out, base_weights_sha256=base_hash, base_model="tiny", base_model_source="config")
    write_model_card(out, SUMMARY, repo_id="me/tiny-fedkseed")
    (out / "eval_results.json").write_text('{"rougeL_after": 0.5}\n')
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "model.safetensors").write_bytes(b"checkpoint weights")
    return out


def local_snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_file_names_agree_with_the_modules_that_write_them():
    assert hub.KSEED_CONFIG_NAME == delta_module.KSEED_CONFIG_NAME
    assert hub.KSEED_DELTA_NAME == delta_module.KSEED_DELTA_NAME
    assert "README.md" in hub.DELTA_FILES


def test_cli_push_uploads_the_run_and_apply_kseed_reads_it_back(fake_hub, output_dir, capsys):
    before = local_snapshot(output_dir)
    assert main(["push", str(output_dir), "--repo_id", "me/tiny-fedkseed", "--private"]) == 0
    expected = {path for path in before if not path.startswith("checkpoint-")}  # never the checkpoints
    assert {"README.md", "config.json", "model.safetensors", "kseed_config.json", "kseed_delta.safetensors"} <= expected
    assert f"Uploaded {len(expected)} files" in capsys.readouterr().out
    assert fake_hub.created == [{"name": "tiny-fedkseed", "organization": "me", "visibility": "private"}]
    (commit,) = fake_hub.commits
    assert set(commit["files"]) == expected
    for path, data in commit["files"].items():
        assert data == before[path], path
    assert commit["repo"] == "me/tiny-fedkseed" and commit["revision"] == "main"
    assert local_snapshot(output_dir) == before  # a push only reads

    # The delta comes back from the "Hub" (only its two files are downloaded) and rebuilds the same model.
    fake_hub.requests.clear()
    from_hub = apply_kseed(tiny_llama(), "me/tiny-fedkseed")
    downloaded = {path.rsplit("/", 1)[-1] for method, path in fake_hub.requests if method == "GET"}
    assert downloaded == {"kseed_config.json", "kseed_delta.safetensors"}
    from_disk = apply_kseed(tiny_llama(), output_dir)
    for a, b in zip(from_hub.parameters(), from_disk.parameters(), strict=True):
        assert torch.equal(a, b)


def test_delta_only_and_dry_run(fake_hub, output_dir, capsys):
    assert main(["push", str(output_dir), "--repo_id", "me/tiny-delta", "--dry_run"]) == 0
    listing = capsys.readouterr().out
    assert fake_hub.requests == []  # a dry run contacts nothing
    size = (output_dir / "model.safetensors").stat().st_size
    assert "Would upload" in listing and f"{size:,} bytes" in listing and "checkpoint-3" not in listing

    assert main(["push", str(output_dir), "--repo_id", "me/tiny-delta", "--delta_only"]) == 0
    (commit,) = fake_hub.commits
    assert set(commit["files"]) == {"README.md", "kseed_config.json", "kseed_delta.safetensors"}
    assert sum(len(data) for data in commit["files"].values()) < 16 * 1024
    assert fake_hub.created[0]["name"] == "tiny-delta" and "visibility" not in fake_hub.created[0]


def test_missing_token_failed_upload_and_bad_folder_are_clear_errors(fake_hub, output_dir, monkeypatch, capsys):
    before = local_snapshot(output_dir)
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", str(output_dir), "--repo_id", "me/x"]) == 1
    assert "No Hugging Face token found: run `hf auth login` or set the `HF_TOKEN`" in capsys.readouterr().err
    assert fake_hub.requests == []

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert main(["push", str(output_dir), "--repo_id", "me/x"]) == 1
    err = capsys.readouterr().err
    assert "Pushing" in err and "failed (" in err and "401" in err and "Nothing local was changed" in err

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake_hub.fail_commits = True
    assert main(["push", str(output_dir), "--repo_id", "me/x"]) == 1
    err = capsys.readouterr().err
    assert "403" in err and "Storage quota exceeded" in err and "run the push again" in err and "Traceback" not in err
    assert fake_hub.commits == [] and local_snapshot(output_dir) == before

    assert main(["push", str(output_dir / "nope"), "--repo_id", "me/x"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (output_dir / "kseed_delta.safetensors").unlink()
    assert main(["push", str(output_dir), "--repo_id", "me/x", "--delta_only"]) == 2
    assert "holds no KSeed delta" in capsys.readouterr().err


def test_trainer_push_to_hub_uploads_our_card_and_the_delta(fake_hub, tmp_path):
    """`push_to_hub=True` goes through the Trainer (repo creation, checkpoint pushes, final push) with our card."""
    model = tiny_llama()
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, VOCAB, (8, 8), generator=generator).tolist()
    optimizer = KSeedZOOptimizer(model, lr=1e-2, eps=1e-3, num_seeds=16, seed=5)
    artifacts = KSeedArtifactsCallback(dict(SUMMARY))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        push_to_hub=True,
        hub_model_id="me/trainer-push",
        hub_strategy="every_save",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        max_grad_norm=0.0,
        logging_steps=1000,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": rows, "labels": rows}),
        optimizers=(optimizer, None),
        callbacks=[artifacts],
    )
    assert fake_hub.created[0]["name"] == "trainer-push"  # the Trainer created the repo at init
    trainer.train()
    artifacts.finish(trainer, {"rougeL_before": 0.1, "rougeL_after": 0.25})
    assert [commit["summary"] for commit in fake_hub.commits][-1] == "End of training"
    assert len(fake_hub.commits) >= 2  # the checkpoint pushes, then the end of training
    for commit in fake_hub.commits:
        card = commit["files"]["README.md"].decode()
        assert "KSeed ZO" in card and "adamw" not in card.lower(), commit["summary"]
        assert {"kseed_config.json", "kseed_delta.safetensors", "model.safetensors"} <= set(commit["files"])
    final = fake_hub.commits[-1]["files"]
    assert "| Rouge-L | 0.1000 | 0.2500 |" in final["README.md"].decode()
    assert not any(path.startswith("checkpoint-") for path in final)
    config = json.loads(final["kseed_config.json"])
    assert config["optimizer_steps"] == 4 and config["base_weights_sha256"] == base_weights_sha256(tiny_llama())
    rebuilt = apply_kseed(tiny_llama(), "me/trainer-push")
    assert max((a - b).abs().max().item() for a, b in zip(rebuilt.parameters(), model.parameters(), strict=True)) < 1e-6


def test_a_failed_trainer_push_says_where_the_outputs_are(fake_hub, tmp_path):
    model = tiny_llama()
    rows = token_batch(4, 8).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        push_to_hub=True,
        hub_model_id="me/fails",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        max_grad_norm=0.0,
    )
    optimizer = KSeedZOOptimizer(model, lr=1e-2, num_seeds=8)
    artifacts = KSeedArtifactsCallback(dict(SUMMARY))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": rows, "labels": rows}),
        optimizers=(optimizer, None),
        callbacks=[artifacts],
    )
    trainer.train()
    fake_hub.fail_commits = True
    with pytest.raises(RuntimeError, match=r"The outputs are saved in .*; push them later with `hf-fedkseed push"):
        artifacts.finish(trainer, None)
    for name in ("kseed_config.json", "kseed_delta.safetensors", "README.md", "model.safetensors"):
        assert (tmp_path / "out" / name).is_file(), name
    assert "create_model_card" not in vars(trainer)  # the Trainer's own method is back


# ---------------------------------------------------------------------- Reliability 12: links out of the folder
def test_a_symlink_out_of_the_output_dir_is_refused_before_any_upload(fake_hub, output_dir, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the run")
    (output_dir / "notes.txt").symlink_to(secret)
    assert main(["push", str(output_dir), "--repo_id", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "'notes.txt'" in err and "symbolic link" in err and "outside the folder" in err and "Traceback" not in err
    assert fake_hub.requests == [] and fake_hub.commits == []
    (output_dir / "notes.txt").unlink()

    elsewhere = tmp_path / "elsewhere"  # a linked folder leads out too
    elsewhere.mkdir()
    (elsewhere / "data.json").write_text("{}")
    (output_dir / "extra").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the folder"):
        hub.files_to_upload(output_dir)
    (output_dir / "extra").unlink()

    (output_dir / "card_copy.md").symlink_to(output_dir / "README.md")  # a link that stays inside is fine
    assert "card_copy.md" in dict(hub.files_to_upload(output_dir))
