"""Training on a researcher's own corpus (famviz.io.corpus): documents, jsonl, Hugging Face datasets."""

from __future__ import annotations

import json
import random
import tracemalloc

import pytest
from helpers import assert_one_line_error, bundled_tokenizer, make_pdf, run_cli_in_process, text_stream

from famviz.errors import ConfigError
from famviz.io.corpus import Corpus, is_held_out
from famviz.training.data import TextCorpus

SENTENCE = "Researchers bring their own text, and the memory should learn from it. "


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_tokenizer()


def _docs_dir(tmp_path, count=30, repeat=40):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    for i in range(count):
        folder = root / "sub" if i % 3 else root
        suffix = (".txt", ".md", ".html")[i % 3]
        body = f"Document {i}. " + SENTENCE * repeat
        (folder / f"doc{i}{suffix}").write_text(
            f"<html><body><p>{body}</p></body></html>" if suffix == ".html" else body
        )
    (root / "notes.bin").write_bytes(b"\x00\x01 not a document")  # skipped: not a document suffix
    return root


def test_a_directory_of_documents_is_split_once_and_read_lazily(tmp_path, tokenizer):
    corpus = Corpus([_docs_dir(tmp_path)])
    assert len(corpus) == 30 and len(corpus.held_out) and len(corpus.training) == 30 - len(corpus.held_out)
    assert set(corpus.training).isdisjoint(corpus.held_out)
    assert list(Corpus([tmp_path / "docs"]).held_out) == list(corpus.held_out)  # a fixed split
    html = next(i for i in corpus.training if corpus.doc_id(i).endswith(".html"))
    assert "<p>" not in corpus.text(html) and SENTENCE.strip() in corpus.text(html)
    text = TextCorpus(tokenizer, documents=corpus)
    window = text.window(random.Random(0), 200)
    assert len(window) == 200
    text.check_long_enough(300)
    with pytest.raises(ConfigError, match="shorter than one training sequence"):
        text.check_long_enough(10_000)
    described = corpus.describe()
    assert described["documents"] == 30 and described["held_out"] == [corpus.doc_id(i) for i in corpus.held_out]
    assert all(i.startswith("docs/") for i in described["held_out"])


def test_the_held_out_rule_is_a_hash_of_the_id():
    ids = [f"doc{i}.txt" for i in range(5000)]
    share = sum(map(is_held_out, ids)) / len(ids)
    assert 0.005 < share < 0.02
    import zlib

    assert [i for i in ids if is_held_out(i)] == [i for i in ids if zlib.crc32(i.encode()) % 1000 < 10]


def test_jsonl_lines_are_indexed_not_loaded(tmp_path, tokenizer):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as handle:
        for i in range(20_000):
            handle.write(json.dumps({"text": f"Record {i}. " + SENTENCE * 14, "id": i}) + "\n")
        handle.write("not json\n")
    assert path.stat().st_size > 20_000_000
    tracemalloc.start()
    corpus = Corpus([path])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4_000_000, peak  # offsets only: the 20 MB of text stay on disk
    assert len(corpus) == 20_001 and corpus.text(corpus.training[0]).startswith("Record")
    text = TextCorpus(tokenizer, documents=corpus)
    assert corpus.doc_id(20_000) == "big.jsonl:20001"
    assert text.text(20_000) == "" and 20_000 in text.unreadable  # an unreadable record is skipped and counted


def test_huggingface_datasets_parquet_and_saved(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"text": [f"Row {i}. " + SENTENCE * 30 for i in range(40)], "n": list(range(40))})
    data.to_parquet(str(tmp_path / "train.parquet"))
    data.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "train.parquet", tmp_path / "saved"):
        corpus = Corpus([path])
        assert len(corpus) == 40 and corpus.text(corpus.training[0]).startswith("Row ")
        assert len(TextCorpus(tokenizer, documents=corpus).window(random.Random(1), 100)) == 100
    datasets.Dataset.from_dict({"body": ["x"]}).to_parquet(str(tmp_path / "other.parquet"))
    with pytest.raises(ConfigError, match="no 'text' column"):
        Corpus([tmp_path / "other.parquet"])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: t / "missing", "does not exist"),
        (lambda t: (t / "empty").mkdir() or t / "empty", "holds no documents"),
        (lambda t: (t / "x.jsonl").write_text('{"body": "no text field"}\n') and t / "x.jsonl", "'text' field"),
        (lambda t: (t / "e.jsonl").write_text("\n\n") and t / "e.jsonl", "is empty"),
        (lambda t: (t / "x.csv").write_text("a,b\n") and t / "x.csv", "not a document"),
    ],
)
def test_bad_corpora_get_one_clear_message(tmp_path, make, message):
    with pytest.raises(ConfigError, match=message):
        Corpus([make(tmp_path)])


def test_cli_train_refuses_a_bad_corpus_in_one_line(tmp_path, capfd):
    status, out, err = run_cli_in_process(
        ["train", "--out", tmp_path / "run", "--corpus", tmp_path / "missing", "--steps", "1"], capfd
    )
    assert_one_line_error(status, out, err, contains=("does not exist",))
    assert status == 2
    status, out, err = run_cli_in_process(
        ["train", "--out", tmp_path / "run", "--corpus", tmp_path, "--data", "passkey"], capfd
    )
    assert_one_line_error(status, out, err, contains=("add copy to --data",))


def test_a_dataset_snapshot_with_a_readme_is_read_as_a_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = tmp_path / "snapshot"
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("# A dataset card\n" + SENTENCE * 50)
    datasets.Dataset.from_dict({"text": [SENTENCE * 20] * 5}).to_parquet(str(root / "data" / "train-0.parquet"))
    corpus = Corpus([root])
    assert len(corpus) == 5 and corpus.doc_id(0) == "snapshot:0"


def test_windows_come_from_the_few_long_documents(tmp_path, tokenizer):
    root = tmp_path / "mixed"
    root.mkdir()
    for i in range(60):
        (root / f"short{i}.txt").write_text(f"Short note {i}.")
    (root / "long.txt").write_text(SENTENCE * 300)
    text = TextCorpus(tokenizer, documents=Corpus([root]))
    text.check_long_enough(400, scan=100)
    rng = random.Random(0)
    assert all(len(text.window(rng, 400)) == 400 for _ in range(20))  # never a failed draw


def test_pdfs_in_a_directory_are_read_and_unreadable_ones_skipped_and_counted(tmp_path, tokenizer):
    root = tmp_path / "papers"
    root.mkdir()
    (root / "paper.pdf").write_bytes(make_pdf(*[text_stream(f"Page {i} of a paper about memory.") for i in range(3)]))
    (root / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> truncated")
    (root / "long.txt").write_text(SENTENCE * 200)
    corpus = Corpus([root])
    index = {corpus.doc_id(i).split("/")[-1]: i for i in range(len(corpus))}
    assert len(corpus) == 3 and "Page 2 of a paper about memory." in corpus.text(index["paper.pdf"])
    text = TextCorpus(tokenizer, documents=corpus)
    assert text.text(index["broken.pdf"]) == "" and text.unreadable == {index["broken.pdf"]}  # skipped, counted
    assert text.text(index["paper.pdf"]).startswith("Page 0")
    (root / "long.txt").unlink()
    only_short = TextCorpus(tokenizer, documents=Corpus([root]))
    with pytest.raises(ConfigError, match="shorter than one training sequence .*1 could not be read"):
        only_short.check_long_enough(500)


def test_a_corrupt_parquet_file_is_one_message(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really a parquet file")
    with pytest.raises(ConfigError, match="broken.parquet"):
        Corpus([tmp_path / "broken.parquet"])


@pytest.mark.slow
def test_cli_trains_on_a_corpus_and_records_it(tmp_path, capfd):
    from helpers import save_tiny_llama_dir

    model_dir = save_tiny_llama_dir(tmp_path / "model")
    docs = _docs_dir(tmp_path, repeat=100)  # ~1,400 tokens each: long enough for the long-document check
    out = tmp_path / "run"
    status, _, err = run_cli_in_process(
        [
            "train",
            "--out",
            out,
            "--model",
            model_dir,
            "--corpus",
            docs,
            "--block-size",
            "64",
            "--fam-len",
            "8",
            "--steps",
            "2",
            "--data",
            "copy",
            "--copy-text-tokens",
            "100-140",
            "--copy-len",
            "32",
            "--threads",
            "1",
            "--eval-every",
            "0",
            "--checkpoint-every",
            "1",
        ],
        capfd,
    )
    assert status == 0, err
    card = json.loads((out / "training_card.json").read_text())
    sources = card["data_mixture"]["text_sources"]
    assert sources["paths"] == [str(docs)] and sources["documents"] == 30 and sources["held_out"]
    assert sources["unreadable_skipped"] == 0
    # evaluate takes its long documents from the corpus's held-out split, as the card records it
    status, stdout, err = run_cli_in_process(
        ["evaluate", out, "--model", model_dir, "--skip-passkey", "--long-tokens", "1024", "--threads", "1", "--json"],
        capfd,
    )
    assert status == 0, err
    result = json.loads(stdout)
    assert [row["document"] for row in result["long_documents"]] == sources["held_out"][:2]
    assert result["long_documents_source"]["corpus"] == [str(docs)]
    status, _, err = run_cli_in_process(
        [
            "train",
            "--out",
            tmp_path / "short",
            "--model",
            model_dir,
            "--corpus",
            docs,
            "--steps",
            "1",
            "--data",
            "copy",
            "--copy-text-tokens",
            "5000-6000",
            "--block-size",
            "64",
            "--fam-len",
            "8",
        ],
        capfd,
    )
    assert_one_line_error(status, "", err, contains=("shorter than one training sequence",))
