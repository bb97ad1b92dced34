"""Run by torchrun in the distributed tests: trains each job of a JSON file in turn (in every process) and
has rank 0 append one JSON line per job to the output file. A job may kill its processes at a step, run the
eval of its config (`evaluate`), and have every rank log how many prompts its eval engine answered."""

import json
import os
import signal
import sys

import tunesmith
from tunesmith.errors import TunesmithError
from tunesmith.eval.engine import Engine
from tunesmith.train import loop

RANK = int(os.environ.get("RANK", "0"))
REAL_FIT, REAL_FORWARD = loop.Trainer.fit, loop.Trainer.forward
REAL_ANSWER = Engine.answer


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


def logging_answers(log_file: str):
    """Engine.answer that appends {"rank", "candidate", "prompts"} to log_file.rankN before answering."""
    def answer(self, candidate, prompts, max_new_tokens=None):
        with open(f"{log_file}.rank{RANK}", "a") as fh:
            fh.write(json.dumps({"rank": RANK, "candidate": candidate.name, "prompts": len(prompts)}) + "\n")
        return REAL_ANSWER(self, candidate, prompts, max_new_tokens)
    return answer


def main(jobs_file: str, out_file: str) -> None:
    for job in json.loads(open(jobs_file).read()):
        loop.Trainer.fit, loop.Trainer.forward = REAL_FIT, REAL_FORWARD
        Engine.answer = logging_answers(out_file + ".answers") if job.get("evaluate") else REAL_ANSWER
        if job.get("kill_at"):
            loop.Trainer.fit = kill_all_after(job["kill_at"])
        if job.get("die_at"):
            loop.Trainer.forward = one_rank_dies_at(job["die_at"], job.get("die_rank", 1))
        config = {**job["config"], **job.get("rank_overrides", {}).get(str(RANK), {})}
        try:
            tunesmith.train(config, progress=False, evaluate=bool(job.get("evaluate")), resume=job.get("resume"))
            result = {"name": config["name"], "ok": True}
        except TunesmithError as e:
            result = {"name": config["name"], "error": e.message}
        if RANK == 0:
            with open(out_file, "a") as fh:
                fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
