import json
import subprocess
import sys

from meo_ds.data.cli import main
from meo_ds.data.lm import LMLoader
from meo_ds.data.mt import MTLoader

from data_helpers import make_docs


def test_tokenizer_lm_mt_commands(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(400, seed=3)))
    assert main(["tokenizer", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "400",
                 "--character-coverage", "1.0"]) == 0
    assert (tmp_path / "tok" / "tokenizer.model").is_file()
    assert main(["lm", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "lm"),
                 "--num-proc", "2", "--valid-fraction", "0.05", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "validation" in out and "20 documents" in out and "400 documents" in out
    assert len(LMLoader(tmp_path / "lm", 8, 2)) > 0
    manifest = json.loads((tmp_path / "lm" / "manifest.json").read_text())
    assert manifest["inputs"][0]["sha256"] and manifest["tokenizer"]["vocab_size"] <= 400

    src, tgt = tmp_path / "s.txt", tmp_path / "t.txt"
    docs = make_docs(200, seed=4)
    src.write_text("\n".join(docs) + "\n\n" + docs[0] + "\n")
    tgt.write_text("\n".join(d.upper() for d in docs) + "\nlonely\n" + docs[0].upper() + "\n")
    assert main(["mt", str(src), str(tgt), "--tokenizer", str(tmp_path / "tok" / "tokenizer.model"),
                 "--out", str(tmp_path / "mt"), "--max-ratio", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "removed by empty                  1" in out and "removed by duplicate              1" in out
    assert len(MTLoader(tmp_path / "mt", 2000)) > 0


def test_errors_exit_2_with_message_and_no_output(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\n")
    assert main(["tokenizer", str(bad), "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err
    assert "bad.txt:2: not valid UTF-8" in err
    assert not (tmp_path / "tok").exists()


def test_console_script_module_entry(tmp_path):
    result = subprocess.run([sys.executable, "-m", "meo_ds.data.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and all(c in result.stdout for c in ("tokenizer", "lm", "mt", "demo"))
