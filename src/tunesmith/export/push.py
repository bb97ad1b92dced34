"""`tunesmith push RUN REPO_ID`: export a run (adapter, merged checkpoint or GGUF, each with its model card)
and upload that folder to the Hugging Face Hub with `huggingface_hub`. The token comes from where
huggingface_hub looks for it: the HF_TOKEN environment variable, else the file `hf auth login` wrote."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TunesmithError

WHAT = {"adapter": "peft", "merged": "merged", "gguf": "gguf"}  # what to push -> export format


@dataclass
class PushResult:
    repo_id: str
    what: str
    private: bool
    folder: Path
    files: list[tuple[str, int]]  # (path inside the repo, bytes)
    uploaded: bool = False
    url: str | None = None
    checks: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        """What is (or would be) uploaded, one file a line, for the console."""
        total = sum(size for _, size in self.files)
        head = (f"{'uploaded' if self.uploaded else 'would upload'} {len(self.files)} files ({total:,} bytes) "
                f"from {self.folder} to https://huggingface.co/{self.repo_id} "
                f"({'private' if self.private else 'public'} model repo)")
        return [head] + [f"  {path}  ({size:,} bytes)" for path, size in self.files]


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise TunesmithError(f"'{repo_id}' is not a Hub repo id: {e}", hint="use OWNER/NAME, e.g. me/banking77") from None
    if "/" not in repo_id:
        raise TunesmithError(f"'{repo_id}' names no owner", hint="use OWNER/NAME (your user or organisation name)")


def folder_files(folder: Path) -> list[tuple[str, int]]:
    return [(p.relative_to(folder).as_posix(), p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()]


def push_run(run_dir: str | Path, repo_id: str, what: str = "adapter", private: bool = False,
             dry_run: bool = False, dtype: str | None = None) -> PushResult:
    """Export the run as `what` (adapter | merged | gguf) into RUN/export/<format> and upload that folder to
    the model repo `repo_id` (created if missing). With dry_run, the export is written and listed, and
    nothing is sent."""
    from .run import export_run

    if what not in WHAT:
        raise TunesmithError(f"cannot push '{what}'", hint=f"choose one of {', '.join(WHAT)}")
    _check_repo_id(repo_id)
    api = None if dry_run else _hub_api()  # before exporting: a missing token should not cost an export
    run_dir = Path(run_dir)
    out = run_dir / "export" / WHAT[what]
    if out.exists():
        shutil.rmtree(out)  # only what this export writes goes up
    exported = export_run(run_dir, WHAT[what], out, dtype)
    result = PushResult(repo_id, what, private, out, folder_files(out), checks=exported.checks)
    if dry_run:
        return result
    result.url = _upload(api, out, repo_id, private, f"{what} from tunesmith run {run_dir.name}")
    result.uploaded = True
    return result


def _hub_api():
    """An HfApi with the user's token; clear errors when offline or without a token."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        raise TunesmithError("cannot upload: offline mode is on (HF_HUB_OFFLINE)",
                             hint="unset HF_HUB_OFFLINE on a machine with internet access, or use --dry-run")
    token = get_token()
    if not token:
        raise TunesmithError("no Hugging Face token found", hint="set HF_TOKEN (a write token) or run `hf auth login`")
    return HfApi(token=token)


def _upload(api, folder: Path, repo_id: str, private: bool, message: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message=f"Upload {message}")
    except HfHubHTTPError as e:
        raise TunesmithError(f"upload to {repo_id} failed: {str(e).splitlines()[0]}",
                             hint="check that the token may write to this repo (a write token) and the name") from None
    except Exception as e:  # noqa: BLE001 - network failures of any transport, said in one line
        raise TunesmithError(f"upload to {repo_id} failed: {type(e).__name__}: {str(e)[:200]}",
                             hint="check the network connection and retry; the export stays in " + str(folder)) from None
    return getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
