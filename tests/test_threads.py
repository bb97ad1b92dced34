import torch

from tunesmith.model import threads


def test_auto_picks_the_faster_setting(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls = []

    def probe(n):
        calls.append(n)
        return {1: 0.5, 2: 0.1}[n]

    monkeypatch.setattr(threads, "_probe", probe)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert threads.best_thread_count() == 2 and calls == [1, 2]
    monkeypatch.setattr(threads, "_probe", lambda n: {1: 0.1, 2: 0.5}[n])
    assert threads.best_thread_count() == 1


def test_explicit_setting_wins(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_CHOSEN", None)
    try:
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setattr(threads, "_CHOSEN", None)
        assert threads.set_threads("auto") == 1
    finally:
        torch.set_num_threads(before)
