"""What each rung's prompt holds: +labels, +prompt:FILE, +rag:K (BM25 and embeddings), +docs:K, knn:K; the
candidate grammar; retrieval never returns an eval example."""

from __future__ import annotations

import numpy as np
import pytest

from tunesmith.data.types import Conversation, Message, Source
from tunesmith.errors import TunesmithError
from tunesmith.eval.candidates import parse_candidate, parse_candidates
from tunesmith.eval.prompts import DOCS_INSTRUCTION, LABELS_INSTRUCTION, PromptBuilder, label_set
from tunesmith.eval.retrieval import Retriever, majority, read_passages

SYSTEM = "Classify the message."
TRAIN_ROWS = [
    ("my card has not arrived yet", "card_arrival"),
    ("when will my new card arrive", "card_arrival"),
    ("what is the exchange rate for euros", "exchange_rate"),
    ("exchange rate to dollars today", "exchange_rate"),
    ("my top up failed again", "top_up_failed"),
    ("the top up did not work", "top_up_failed"),
    ("is my card arriving this week", "card_arrival"),
]


def _conv(user, answer, line, system=SYSTEM):
    msgs = ((Message("system", system),) if system else ()) + (Message("user", user), Message("assistant", answer))
    return Conversation(msgs, Source("train.jsonl", line))


@pytest.fixture
def train():
    return [_conv(u, a, i + 1) for i, (u, a) in enumerate(TRAIN_ROWS)]


def _prompt(user, system=SYSTEM):
    return ((Message("system", system),) if system else ()) + (Message("user", user),)


def test_labels_prompt_lists_every_training_label(train):
    builder = PromptBuilder([_prompt("card still not here"), _prompt("rate?", system=None)], train)
    prompts, added = builder.build(parse_candidate("base+labels"))
    listing = LABELS_INSTRUCTION + "\ncard_arrival\nexchange_rate\ntop_up_failed"
    assert prompts[0][0] == Message("system", f"{SYSTEM}\n\n{listing}", train=False)
    assert prompts[1][0].content == listing and prompts[1][1:] == (Message("user", "rate?"),)
    assert added == {"labels": 3}
    builder = PromptBuilder([_prompt("x", system=None)], train, default_system="The run's system prompt.")
    assert builder.build(parse_candidate("base+labels"))[0][0][0].content.startswith("The run's system prompt.\n\n")


def test_labels_refuse_free_text_answers():
    free = [_conv(f"q{i}", " ".join(["word"] * 20) + str(i), i) for i in range(3)]
    with pytest.raises(TunesmithError, match="label-style training data"):
        label_set(free)


def test_prompt_file_replaces_the_system_message(tmp_path, train):
    path = tmp_path / "prompt.txt"
    path.write_text("You are a banking intent classifier.\n")
    builder = PromptBuilder([_prompt("card?")], train)
    prompts, added = builder.build(parse_candidate(f"base+prompt:{path}+labels"))
    assert prompts[0][0].content.startswith("You are a banking intent classifier.\n\n" + LABELS_INSTRUCTION)
    assert [m.role for m in prompts[0]] == ["system", "user"] and added["prompt_file"] == str(path)
    with pytest.raises(TunesmithError, match="needs an existing text file"):
        parse_candidate(f"base+prompt:{tmp_path / 'missing.txt'}")


def test_rag_shows_the_nearest_training_examples_never_eval_ones(train):
    eval_prompts = [_prompt("my top up failed, why"), _prompt("when will my new card arrive")]
    builder = PromptBuilder(eval_prompts, train)
    prompts, added = builder.build(parse_candidate("base+rag:2"))
    first = prompts[0]
    assert first[0].role == "system" and first[-1] == eval_prompts[0][1]
    shown = [m.content for m in first[1:-1] if m.role == "user"]
    assert set(shown) == {"my top up failed again", "the top up did not work"}
    assert [m.content for m in first[1:-1] if m.role == "assistant"] == ["top_up_failed"] * 2
    # the second eval prompt is also a training prompt: that training row is never shown
    assert "when will my new card arrive" not in [m.content for m in prompts[1][1:-1]]
    assert all(len(sources) == 2 and all(s.startswith("train.jsonl:") for s in sources) for sources in added["rag"])
    assert not any(m.train for p in prompts for m in p[1:-1])  # shots are context, never scored


def test_rag_puts_the_best_match_next_to_the_question(train):
    builder = PromptBuilder([_prompt("exchange rate for euros please")], train)
    prompts, added = builder.build(parse_candidate("base+rag:3"))
    users = [m.content for m in prompts[0][1:-1] if m.role == "user"]
    assert users[-1] == "what is the exchange rate for euros"  # the closest shot sits last
    assert added["rag"][0][0] == "train.jsonl:3"  # results.json lists them best first


def test_knn_votes_and_embedding_retrieval(train):
    builder = PromptBuilder([_prompt("card arrive when"), _prompt("top up failed")], train)
    assert builder.knn_answers(parse_candidate("knn:3")) == ["card_arrival", "top_up_failed"]

    def bag_of_words(texts):  # an embedding anyone can check by hand
        vocab = sorted({w for u, _ in TRAIN_ROWS for w in u.split()})
        return np.array([[t.split().count(w) for w in vocab] for t in texts], dtype=float)

    embedded = PromptBuilder([_prompt("exchange rate dollars")], train, embed=bag_of_words)
    assert embedded.knn_answers(parse_candidate("knn:1:embed")) == ["exchange_rate"]
    prompts, _ = embedded.build(parse_candidate("base+rag:1:embed"))
    assert prompts[0][1].content == "exchange rate to dollars today"


def test_retrieval_time_is_charged_per_query_and_the_index_once(train):
    """An embedder that takes 0.3 s per call: the index (one call over the training prompts) is built once and
    charged to no candidate; each candidate's searches (one call over its queries) are charged to it."""
    import time

    def slow_embed(texts):
        time.sleep(0.3)
        return np.array([[len(t), t.count("card"), t.count("rate")] for t in texts], dtype=float)

    builder = PromptBuilder([_prompt("card arrive when"), _prompt("rate today")], train, embed=slow_embed)
    knn = parse_candidate("knn:1:embed")
    started = time.perf_counter()
    builder.index(knn)
    assert time.perf_counter() - started >= 0.3 and builder.search_seconds == {}
    builder.knn_answers(knn)
    builder.build(parse_candidate("base+rag:1:embed"))
    assert set(builder.search_seconds) == {"knn:1:embed", "base+rag:1:embed"}
    assert all(0.3 <= s < 0.6 for s in builder.search_seconds.values())  # one query call each, no index build


def test_majority_breaks_ties_by_rank():
    assert majority(["b", "a", "a", "b", "c"]) == "b"
    assert majority(["x"]) == "x"


def test_docs_passages_are_retrieved_per_question(tmp_path, train):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "cards.md").write_text("# Cards\n\nNew cards arrive within 5 working days.\n\nLost cards can be frozen.")
    (docs / "sub" / "fx.txt").write_text("The exchange rate is set daily at noon.")
    (docs / "image.png").write_bytes(b"\x89PNG")
    passages = read_passages(docs)
    assert [name for name, _ in passages] == ["cards.md", "sub/fx.txt"]  # short paragraphs are merged
    builder = PromptBuilder([_prompt("what exchange rate do you use"), _prompt("when do cards arrive")], train,
                            docs=docs)
    prompts, added = builder.build(parse_candidate("base+docs:1"))
    assert prompts[0][0].content == f"{SYSTEM}\n\n{DOCS_INSTRUCTION}\n\n[1] (sub/fx.txt) The exchange rate is set " \
                                    "daily at noon."
    assert "(cards.md)" in prompts[1][0].content and added["docs"] == [["sub/fx.txt"], ["cards.md"]]
    with pytest.raises(TunesmithError, match="no text files"):
        read_passages(_empty(tmp_path))
    with pytest.raises(TunesmithError, match="pass --docs FOLDER"):
        PromptBuilder([_prompt("q")], train).build(parse_candidate("base+docs:1"))


def _empty(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    return path


def test_long_paragraphs_are_split_into_passages(tmp_path):
    (tmp_path / "long.txt").write_text(" ".join(f"w{i}" for i in range(300)))
    passages = read_passages(tmp_path)
    assert [len(text.split()) for _, text in passages] == [120, 120, 60]


def test_bm25_ranks_by_term_overlap():
    retriever = Retriever(["the card arrived", "exchange rate euros", "card card card delivery"])
    assert retriever.search(["card delivery"], 2) == [[2, 0]]
    assert retriever.search(["zzz"], 5)[0] != []  # no overlap: still k (clamped) results, all scored 0
    with pytest.raises(TunesmithError, match="corpus is empty"):
        Retriever([])


@pytest.mark.parametrize("spec, error", [
    ("base+rag:0", "positive integer"), ("base+fewshot:2+rag:2", "both add shots"), ("knn:x", "positive integer"),
    ("base+rag:3:dense", "unknown retriever"), ("base+labels+labels", "given twice"),
    ("knn:3+labels", "no prompt modifiers"), ("http://h:1/v1", "names no model"), ("runs/none", "unknown candidate"),
])
def test_candidate_errors(spec, error):
    with pytest.raises(TunesmithError, match=error):
        parse_candidates(spec)


def test_candidate_grammar():
    c = parse_candidate("http://127.0.0.1:8000/v1#my-model+labels+rag:5")
    assert (c.kind, c.url, c.model, c.labels, c.rag, c.tuned) == ("endpoint", "http://127.0.0.1:8000/v1", "my-model",
                                                                  True, 5, False)
    assert c.name == "http://127.0.0.1:8000/v1#my-model+labels+rag:5"
    k = parse_candidate("knn:7:embed")
    assert (k.kind, k.knn, k.retriever, k.generates) == ("knn", 7, "embed", False)
