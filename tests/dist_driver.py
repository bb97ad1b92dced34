"""Run by torchrun in the distributed tests: trains each job of a JSON file in turn (in every process) and
has rank 0 append one JSON line per job to the output file. A job may kill its processes at a step."""

import json
import os
import signal
import sys

import tunesmith
from tunesmith.errors import TunesmithError
from tunesmith.train import loop

RANK = int(os.environ.get("RANK", "0"))
REAL_FIT, REAL_FORWARD = loop.Trainer.fit, loop.Trainer.forward


def kill_all_after(step: int):
    """Every process SIGKILLs itself once step `step` is logged and checkpointed (a kill -9 of the run)."""
    def fit(self, on_record=None):
        def record(rec):
            on_record(rec)
            if self.state.step == step:
                self.parallel.barrier()
                os.kill(os.getpid(), signal.SIGKILL)
        return REAL_FIT(self, record)
    return fit


def one_rank_dies_at(step: int, rank: int):
    """Process `rank` SIGKILLs itself in the middle of step `step`, before its backward pass."""
    def forward(self, mb):
        if RANK == rank and self.state.step == step - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return REAL_FORWARD(self, mb)
    return forward


def main(jobs_file: str, out_file: str) -> None:
    for job in json.loads(open(jobs_file).read()):
        loop.Trainer.fit, loop.Trainer.forward = REAL_FIT, REAL_FORWARD
        if job.get("kill_at"):
            loop.Trainer.fit = kill_all_after(job["kill_at"])
        if job.get("die_at"):
            loop.Trainer.forward = one_rank_dies_at(job["die_at"], job.get("die_rank", 1))
        config = {**job["config"], **job.get("rank_overrides", {}).get(str(RANK), {})}
        try:
            tunesmith.train(config, progress=False, evaluate=False, resume=job.get("resume"))
            result = {"name": config["name"], "ok": True}
        except TunesmithError as e:
            result = {"name": config["name"], "error": e.message}
        if RANK == 0:
            with open(out_file, "a") as fh:
                fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
