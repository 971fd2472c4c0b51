"""`moh push`: folder verification (every refusal names the bad piece), dry run, offline/no-token/no-network
errors as one line, and the upload call path with HfApi's methods replaced (the real calls stay in the code)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import CommitInfo, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError

from moh_convert import MoHError, convert
from moh_convert import folder_checks, hub
from moh_convert.cli import main

INDEX = "model.safetensors.index.json"
ROUTER_SHARD = "model-moh-routers.safetensors"
BASE_SHARD = "model-00001-of-00001.safetensors"


def save_tiny_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the tiny models' 128-token vocabulary, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_moh_template(tiny_checkpoints, tmp_path_factory) -> Path:
    """A converted tiny llama with a tokenizer and a learned router, so it has two shards and an index."""
    source = tmp_path_factory.mktemp("tiny-source") / "llama"
    shutil.copytree(tiny_checkpoints["llama"], source)
    save_tiny_tokenizer(source)
    out = tmp_path_factory.mktemp("tiny-moh") / "tiny-moh"
    return convert(source, out, active_heads=3, shared_heads=2, router="learned", base_model="someone/tiny-llama", no_calibration=True)


@pytest.fixture
def moh_folder(tiny_moh_template, tmp_path) -> Path:
    """A fresh copy per test, free to damage."""
    return Path(shutil.copytree(tiny_moh_template, tmp_path / "tiny-moh"))


def write_eval_dir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    comparison = {
        "model": "/home/me/tiny-moh", "baseline": "someone/tiny-llama", "active_heads_fraction": 0.75,
        "tasks": [
            {"task": "hellaswag", "metric": "acc_norm", "num_fewshot": 10, "moh": 41.2, "baseline": 43.3},
            {"task": "arc_easy", "metric": "acc", "num_fewshot": 0, "moh": 55.0, "baseline": 56.0},
        ],
        "average": {"moh": 48.1, "baseline": 49.65},
    }
    (folder / "comparison.json").write_text(json.dumps(comparison))
    # As `moh eval` writes it: a title naming the compared models, one line of prose, the table.
    (folder / "results_table.md").write_text(
        "# moh eval: `/home/me/tiny-moh` vs baseline `someone/tiny-llama`\n\n"
        "Scores in percent (lm-eval); first 100 documents of each task; data: lm-eval's data sets.\n\n"
        "| task | metric | shots | baseline (100% heads) | MoH (75% heads) | Δ |\n| --- | --- | ---: | ---: | ---: | ---: |\n"
        "| hellaswag | acc_norm | 10 | 43.3 | 41.2 | -2.1 |\n| arc_easy | acc | 0 | 56.0 | 55.0 | -1.0 |\n"
        "| **average** | | | 49.7 | 48.1 | -1.6 |\n"
    )
    return folder


# ---------------------------------------------------------------- verification and dry run


def test_dry_run_lists_every_file_with_its_size(moh_folder, monkeypatch):
    # A dry run needs neither a token nor the network: offline mode on and every HfApi call forbidden.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for method in ("create_repo", "create_branch", "create_commit", "upload_folder", "model_info"):
        monkeypatch.setattr(huggingface_hub.HfApi, method, lambda *a, **k: pytest.fail("dry run called the Hub"))
    (moh_folder / ".cache").mkdir()
    (moh_folder / ".cache" / "leftover.lock").write_text("")

    result = hub.push(moh_folder, "me/tiny-moh", dry_run=True)

    on_disk = sorted(path.name for path in moh_folder.iterdir() if path.is_file())
    assert [upload.path_in_repo for upload in result.files] == on_disk  # hidden .cache is not uploaded
    for upload in result.files:
        if upload.path_in_repo == "README.md":
            assert upload.size == len(upload.content)
            assert 'from_pretrained("me/tiny-moh", trust_remote_code=True)' in upload.content.decode()
        else:
            assert upload.size == (moh_folder / upload.path_in_repo).stat().st_size
    assert result.total_size == sum(upload.size for upload in result.files)
    assert result.dry_run and result.commit_url is None
    # The local card is left as it was: only the uploaded copy is rendered for the Hub.
    assert 'from_pretrained("tiny-moh"' in (moh_folder / "README.md").read_text()


def test_cli_dry_run_prints_files_sizes_and_total(moh_folder, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(moh_folder / "no-token-here"))
    assert main(["push", str(moh_folder), "me/tiny-moh", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Would upload 10 files to me/tiny-moh (main):")
    for name in (BASE_SHARD, ROUTER_SHARD, INDEX, "config.json", "modeling_moh.py", "tokenizer.json"):
        assert f"{(moh_folder / name).stat().st_size:,} bytes  {name}\n" in printed
    assert "README.md  (model card, as rendered for the Hub)" in printed
    assert "Total: " in printed and "nothing was uploaded" in printed


def remove(name):
    return lambda folder: (folder / name).unlink()


def edit_json(name, change):
    def edit(folder):
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))
    return edit


def index_names_missing_shard(index):
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"


def index_moves_tensor_to_wrong_shard(index):
    index["weight_map"]["lm_head.weight"] = ROUTER_SHARD


def truncate_base_shard(folder):
    path = folder / BASE_SHARD
    path.write_bytes(path.read_bytes()[:-100])


def add_stray_shard(folder):
    shutil.copyfile(folder / ROUTER_SHARD, folder / "model-extra.safetensors")


@pytest.mark.parametrize(
    "damage, message",
    [
        (edit_json(INDEX, index_names_missing_shard), f"{INDEX} names shard(s) model-00002-of-00002.safetensors that are missing"),
        (remove(ROUTER_SHARD), f"{INDEX} names shard(s) {ROUTER_SHARD} that are missing"),
        (add_stray_shard, f"weights file(s) model-extra.safetensors are not listed in {INDEX}"),
        (edit_json(INDEX, index_moves_tensor_to_wrong_shard), f"puts tensor(s) lm_head.weight in {ROUTER_SHARD}, but"),
        (truncate_base_shard, f"weights file {BASE_SHARD} is truncated"),
        (remove(INDEX), f"{INDEX} is missing, so weights file(s) {BASE_SHARD}, {ROUTER_SHARD} would not be loaded"),
        (edit_json("config.json", lambda config: config.pop("auto_map")), "config.json has no auto_map"),
        (edit_json("config.json", lambda config: config["auto_map"].pop("AutoModelForCausalLM")), "lacks AutoModelForCausalLM"),
        (edit_json("config.json", lambda config: config.update(model_type="llama")), "has model_type 'llama', not 'moh'"),
        (remove("config.json"), "has no config.json"),
        (remove("modeling_moh.py"), "modeling file modeling_moh.py is missing"),
        (remove("configuration_moh.py"), "modeling file configuration_moh.py is missing"),
        (remove("tokenizer_config.json"), "has no tokenizer (tokenizer_config.json is missing)"),
        (remove("tokenizer.json"), "has no tokenizer vocabulary"),
        (remove("README.md"), "has no model card (README.md)"),
    ],
)
def test_incomplete_folder_is_refused_naming_the_piece(moh_folder, damage, message):
    damage(moh_folder)
    with pytest.raises(MoHError) as raised:
        hub.push(moh_folder, "me/tiny-moh", dry_run=True)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_modeling_file_imports_are_followed(moh_folder):
    # modeling_moh.py imports .configuration_moh: a helper module it imports must ship too.
    modeling = moh_folder / "modeling_moh.py"
    modeling.write_text("from .moh_helpers import something\n" + modeling.read_text())
    with pytest.raises(MoHError, match="modeling file moh_helpers.py is missing"):
        hub.push(moh_folder, "me/tiny-moh", dry_run=True)


def test_folder_that_does_not_load_without_the_toolkit_is_refused(moh_folder, monkeypatch):
    # Files complete, but the shipped code imports moh_convert, which users will not have installed. (A modified
    # file is refused before it runs, so this one is made a "known release" for the test.)
    modeling = moh_folder / "modeling_moh.py"
    modeling.write_text("import moh_convert\n" + modeling.read_text())
    known = folder_checks.known_modeling_hashes()
    known["modeling_moh.py"].add(folder_checks.file_sha256(modeling))
    monkeypatch.setattr(folder_checks, "known_modeling_hashes", lambda: known)
    with pytest.raises(MoHError) as raised:
        hub.push(moh_folder, "me/tiny-moh", dry_run=True)
    assert "does not load in a fresh Python without moh_convert" in str(raised.value)
    assert "loading the model failed: ModuleNotFoundError: import of moh_convert halted" in str(raised.value)


def test_weights_the_config_does_not_use_are_refused(moh_folder):
    # The learned router's tensors are in the weights, but a query-norm config has no parameter for them.
    edit_json("config.json", lambda config: config.update(router="query-norm"))(moh_folder)
    with pytest.raises(MoHError, match=r"weights the model does not use: model\.layers\.0\.self_attn\.moh\.router"):
        hub.push(moh_folder, "me/tiny-moh", dry_run=True)


def test_bad_repo_id_and_bad_eval_dir_are_refused(moh_folder, tmp_path):
    with pytest.raises(MoHError, match="invalid Hub repository id 'me/tiny moh'"):
        hub.push(moh_folder, "me/tiny moh", dry_run=True)
    eval_dir = write_eval_dir(tmp_path / "eval")
    (eval_dir / "results_table.md").unlink()
    with pytest.raises(MoHError, match="has no results_table.md"):
        hub.push(moh_folder, "me/tiny-moh", dry_run=True, eval_dir=eval_dir)
    with pytest.raises(MoHError, match="unknown option 'privat'"):
        hub.push(moh_folder, "me/tiny-moh", privat=True)


# ---------------------------------------------------------------- offline, no token, no network


def run_push_cli(folder, *args, env_changes: dict, cwd: Path):
    env = {**os.environ, **env_changes}
    for name in [name for name, value in env_changes.items() if value is None]:
        env.pop(name)
    return subprocess.run(
        [sys.executable, "-m", "moh_convert", "push", str(folder), "me/tiny-moh", *args],
        capture_output=True, text=True, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
    )


def assert_one_error_line(result, message):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("moh push: error: ") and message in lines[0]


def test_offline_mode_is_one_clear_line(moh_folder, tmp_path):
    result = run_push_cli(moh_folder, env_changes={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test"}, cwd=tmp_path)
    assert_one_error_line(result, "offline mode is on (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1)")
    assert "--dry-run" in result.stderr


def test_no_token_is_one_clear_line(moh_folder, tmp_path):
    env_changes = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": None, "HUGGING_FACE_HUB_TOKEN": None, "HF_HOME": str(tmp_path / "hf")}
    result = run_push_cli(moh_folder, env_changes=env_changes, cwd=tmp_path)
    assert_one_error_line(result, "not logged in to the Hugging Face Hub: set HF_TOKEN")


def test_unreachable_hub_is_one_clear_line(moh_folder, tmp_path):
    # Real huggingface_hub calls against an endpoint where nothing listens: what a machine without network sees.
    env_changes = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = run_push_cli(moh_folder, env_changes=env_changes, cwd=tmp_path)
    assert_one_error_line(result, "cannot reach the Hugging Face Hub (ConnectError")


# ---------------------------------------------------------------- the upload call path, HfApi replaced


class RecordingHub:
    """Stands in for the Hub: records each HfApi call with its arguments and answers like the Hub would."""

    def __init__(self, monkeypatch, base_model_license="apache-2.0", commit_error=None):
        self.calls = []
        self.base_model_license = base_model_license
        self.commit_error = commit_error
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        for name in ("create_repo", "create_branch", "create_commit", "model_info"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, self.recorder(name))

    def recorder(self, name):
        def method(api, *args, **kwargs):
            self.calls.append((name, args, kwargs, api.token))
            return getattr(self, f"answer_{name}")(*args, **kwargs)
        return method

    def answer_create_repo(self, repo_id, **kwargs):
        return f"https://huggingface.co/{repo_id}"

    def answer_create_branch(self, repo_id, **kwargs):
        return None

    def answer_model_info(self, repo_id, **kwargs):
        return SimpleNamespace(card_data=ModelCardData(license=self.base_model_license))

    def answer_create_commit(self, repo_id, operations, **kwargs):
        if self.commit_error:
            raise self.commit_error
        pr_url = f"https://huggingface.co/{repo_id}/discussions/1" if kwargs.get("create_pr") else None
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc123", commit_message=kwargs["commit_message"],
            commit_description="", oid="abc123", pr_url=pr_url,
        )

    def named(self, name):
        return [(args, kwargs, token) for call_name, args, kwargs, token in self.calls if call_name == name]


def test_push_creates_repo_branch_and_one_commit(moh_folder, tmp_path, monkeypatch):
    fake_hub = RecordingHub(monkeypatch)
    eval_dir = write_eval_dir(tmp_path / "eval")

    result = hub.push(
        moh_folder, "me/tiny-moh", private=True, revision="calibrated", create_pr=True,
        commit_message="MoH 3/4 heads", eval_dir=eval_dir,
    )

    assert [name for name, *_ in fake_hub.calls] == ["model_info", "create_repo", "create_branch", "create_commit"]
    assert all(token == "hf_test_token" for *_, token in fake_hub.calls)
    assert fake_hub.named("model_info")[0][0] == ("someone/tiny-llama",)
    (args, kwargs, _), = fake_hub.named("create_repo")
    assert args == ("me/tiny-moh",) and kwargs == {"repo_type": "model", "private": True, "exist_ok": True}
    (args, kwargs, _), = fake_hub.named("create_branch")
    assert args == ("me/tiny-moh",) and kwargs["branch"] == "calibrated" and kwargs["exist_ok"] is True
    (args, kwargs, _), = fake_hub.named("create_commit")
    repo_id, operations = args
    assert repo_id == "me/tiny-moh"
    assert kwargs == {
        "repo_type": "model", "commit_message": "MoH 3/4 heads", "revision": "calibrated", "create_pr": True,
    }
    # Every file of the folder is in the one commit, read from the folder; the card is the rendered one.
    by_path = {operation.path_in_repo: operation.path_or_fileobj for operation in operations}
    assert sorted(by_path) == sorted(path.name for path in moh_folder.iterdir())
    for path_in_repo, source in by_path.items():
        if path_in_repo != "README.md":
            assert Path(source) == moh_folder / path_in_repo
    card = ModelCard(by_path["README.md"].decode())
    assert card.data.license == "apache-2.0"  # inherited from the base model's Hub card
    assert [entry.dataset_type for entry in card.data.eval_results] == ["hellaswag", "arc_easy"]
    assert "| hellaswag | acc_norm | 10 | 43.3 | 41.2 | -2.1 |" in card.text
    assert result.commit_url == "https://huggingface.co/me/tiny-moh/commit/abc123"
    assert result.pr_url == "https://huggingface.co/me/tiny-moh/discussions/1"


def test_cli_defaults_reach_the_hub_calls(moh_folder, monkeypatch, capsys):
    fake_hub = RecordingHub(monkeypatch, base_model_license=None)
    monkeypatch.setattr(hub, "check_loads_in_fresh_process", lambda folder: None)  # covered by the tests above

    assert main(["push", str(moh_folder), "me/tiny-moh"]) == 0

    assert [name for name, *_ in fake_hub.calls] == ["model_info", "create_repo", "create_commit"]  # no branch
    (_, kwargs, _), = fake_hub.named("create_repo")
    assert kwargs["private"] is None  # the organisation's default visibility applies
    (_, kwargs, _), = fake_hub.named("create_commit")
    assert kwargs["revision"] is None and kwargs["create_pr"] is False
    assert kwargs["commit_message"] == hub.DEFAULT_COMMIT_MESSAGE
    printed = capsys.readouterr().out
    assert printed.startswith("Uploaded 10 files to me/tiny-moh (main):")
    assert "Commit: https://huggingface.co/me/tiny-moh/commit/abc123" in printed


def http_error(status: int) -> HfHubHTTPError:
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return HfHubHTTPError(f"{status} Client Error\n\nmore detail on a second line", response=response)


@pytest.mark.parametrize(
    "error, message",
    [
        (http_error(401), "the Hub rejected the token (HTTP 401)"),
        (http_error(403), "your token may not write to me/tiny-moh (HTTP 403)"),
        (http_error(500), "the Hub refused the push to me/tiny-moh: 500 Client Error"),
    ],
)
def test_hub_errors_become_one_line(moh_folder, monkeypatch, error, message):
    RecordingHub(monkeypatch, commit_error=error)
    monkeypatch.setattr(hub, "check_loads_in_fresh_process", lambda folder: None)
    with pytest.raises(MoHError) as raised:
        hub.push(moh_folder, "me/tiny-moh")
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_check_push_ready_fails_before_any_work(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MoHError, match="offline mode is on"):
        hub.check_push_ready("me/tiny-moh")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub.check_push_ready("me/tiny-moh")
    with pytest.raises(MoHError, match="invalid Hub repository id"):
        hub.check_push_ready("me/bad id")


# ---------------------------------------------------------------- acceptance on the real SmolLM2-135M

LOAD_AND_GENERATE = r"""
import sys
sys.modules["moh_convert"] = None  # any import of moh_convert now raises ImportError
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
inputs = tokenizer("The capital of France is", return_tensors="pt")
tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
assert tokens.shape[1] == inputs["input_ids"].shape[1] + 8
print("GENERATED:", tokenizer.decode(tokens[0]))
"""


@pytest.mark.slow
def test_dry_run_on_converted_smollm2_and_the_listed_folder_loads(smollm2_folder, tmp_path):
    out = convert(smollm2_folder, tmp_path / "smollm2-moh", active_heads=6, shared_heads=3, no_calibration=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TOKEN", None)
    result = subprocess.run(
        [sys.executable, "-m", "moh_convert", "push", str(out), "user/SmolLM2-135M-MoH", "--dry-run"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    listed = {}
    for line in result.stdout.splitlines():
        if " bytes  " in line:
            size, name = line.split(" bytes  ")
            listed[name.split("  (")[0]] = int(size.replace(",", ""))
    on_disk = {path.name: path.stat().st_size for path in out.iterdir()}
    assert set(listed) == set(on_disk)
    assert {"model.safetensors", "config.json", "modeling_moh.py", "configuration_moh.py", "tokenizer.json"} <= set(listed)
    assert all(listed[name] == size for name, size in on_disk.items() if name != "README.md")
    total = int(result.stdout.split("Total: ")[1].split(" bytes")[0].replace(",", ""))
    assert total == sum(listed.values()) > 100_000_000  # 135M parameters in float32

    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, str(out)], capture_output=True, text=True, cwd=tmp_path,
        env={**env, "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}, stdin=subprocess.DEVNULL,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "GENERATED: The capital of France is" in loaded.stdout
