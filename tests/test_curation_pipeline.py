"""The curation pipeline end to end on a WARC built here: report, output, resume, Ray == local."""

import json
import os
import random

from jaxlm import curate
from jaxlm.curation import warc
from jaxlm.curation.engines import LocalEngine, RayEngine
from jaxlm.curation.pipeline import PipelineConfig, run_pipeline

SENTENCES = """The old mill stood beside the river for two hundred years before the flood.
Farmers brought their grain across the stone bridge every autumn after the harvest.
In the evenings the miller wrote letters to his brother who lived in the city.
The village school had a single room heated by an iron stove in the corner.
Children learned their letters from a worn book that had belonged to their grandparents.
A narrow road climbed the hill behind the church toward the forest and the quarry.
Travellers sometimes stopped at the inn to rest their horses and share the news.
The river froze in the coldest winters and people walked across it to the market.
Each spring the meadows filled with flowers and the bees returned to the orchards.
The blacksmith repaired ploughs and wheels and made nails for the new houses.
When the railway arrived the town grew quickly and the mill lost its customers.
Today the building is a small museum that explains how flour was once made.""".split("\n")
FOOTER = "<p>Copyright Example Corp. All rights reserved. Contact us for more information.</p>"
GERMAN = ("Die alte M\u00fchle stand zweihundert Jahre lang am Fluss, bevor das Hochwasser kam. Die Bauern brachten "
          "ihr Getreide jeden Herbst \u00fcber die steinerne Br\u00fccke. Am Abend schrieb der M\u00fcller Briefe an "
          "seinen Bruder, der in der Stadt lebte. Die Dorfschule hatte einen einzigen Raum mit einem Ofen. ") * 2


def _page(paragraph: str) -> bytes:
    return f"<html><body><p>{paragraph}</p>{FOOTER}</body></html>".encode()


def _english(rng: random.Random) -> str:
    return " ".join(rng.sample(SENTENCES, 8))


def build_inputs(directory) -> list[str]:
    """Two WARC files: good English pages, plus one of each thing a stage should remove."""
    rng = random.Random(0)
    english = [_english(rng) for _ in range(6)]
    near_duplicate = english[1].replace("the flood", "the great flood").replace("autumn", "fall")
    first = [warc.make_record(f"http://a/{i}", _page(text)) for i, text in enumerate(english[:3])]
    first.append(warc.make_record("http://a/de", _page(GERMAN)))
    first.append(warc.make_record("http://a/short", _page("Too short to keep.")))
    first.append(warc.make_record("http://a/pii", _page(english[3] + " Mail bob@example.com or call 283-182-3829.")))
    second = [warc.make_record(f"http://b/{i}", _page(text)) for i, text in enumerate(english[4:])]
    second.append(warc.make_record("http://b/copy", _page(english[0])))  # exact copy of http://a/0
    second.append(warc.make_record("http://b/near", _page(near_duplicate)))
    second.append(warc.make_record("http://b/bad", _page(english[5]))[:120])  # cut short: corrupt
    paths = [os.path.join(directory, "first.warc.gz"), os.path.join(directory, "second.warc")]
    warc.write_warc(paths[0], first)
    warc.write_warc(paths[1], second)
    return paths


def _outputs(out: str) -> dict:
    directory = os.path.join(out, "text")
    return {name: _read(os.path.join(directory, name)) for name in sorted(os.listdir(directory))}


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def test_cli_filters_masks_deduplicates_and_resumes(tmp_path):
    inputs = build_inputs(str(tmp_path))
    out = str(tmp_path / "out")
    arguments = ["--input", *inputs, "--out", out, "--num-workers", "1", "--no-progress",
                 "--num-hashes", "64", "--num-bands", "16", "--jaccard-threshold", "0.7"]
    assert curate.main(arguments) == 0
    report = json.loads(_read(os.path.join(out, "report.json")))
    assert report["records"]["records"] == 11 and report["records"]["corrupt_records"] == 1
    stages = {stage["stage"]: stage for stage in report["stages"]}
    assert stages["read"]["documents_in"] == 10 and stages["read"]["documents_out"] == 10
    assert stages["langid"]["dropped"] == {"language": 1}
    assert stages["gopher"]["dropped"] == {"too_few_words": 1}
    assert stages["exact_dedup"]["dropped"] == {"duplicate": 1}
    assert stages["minhash"]["dropped"] == {"duplicate": 1}
    assert report["pii_masked"] == {"email": 1, "ip": 0, "phone": 1}
    assert report["documents_out"] == 6
    texts = "".join(_outputs(out).values()).split("<|endoftext|>")
    assert texts[-1] == "" and len(texts) == 7
    assert not any("Copyright Example Corp" in text for text in texts)  # the footer line repeats
    assert any("|||EMAIL_ADDRESS|||" in text and "|||PHONE_NUMBER|||" in text for text in texts)
    assert not any("great flood" in text for text in texts)  # the later near-duplicate goes
    # resume: a finished run is not redone; a file whose report is gone is redone alone
    before = _outputs(out)
    step = os.path.join(out, "steps", "0-read+langid+pii+gopher")
    removed = [name for name in os.listdir(step) if name.startswith("second") and name.endswith(".report.json")]
    os.remove(os.path.join(step, removed[0]))
    untouched = [os.path.join(step, name) for name in os.listdir(step) if name.startswith("first") and name.endswith(".jsonl")]
    stamp = os.path.getmtime(untouched[0])
    assert curate.main(arguments) == 0
    assert _outputs(out) == before and os.path.getmtime(untouched[0]) == stamp
    assert json.loads(_read(os.path.join(out, "report.json"))) == report


def test_cli_rejects_bad_input_with_a_clear_error(tmp_path, capsys):
    assert curate.main(["--input", str(tmp_path / "missing.warc"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert curate.main(["--input", str(tmp_path), "--out", str(tmp_path / "o"), "--stages", "classifier",
                        "--no-progress"]) == 2
    assert "classifier_path" in capsys.readouterr().err


def test_ray_engine_gives_the_same_output_as_local_processes(tmp_path):
    import ray

    inputs = build_inputs(str(tmp_path))
    config = PipelineConfig()
    with LocalEngine(num_workers=2, progress=False) as engine:
        local_report = run_pipeline(inputs, str(tmp_path / "local"), config, engine)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RayEngine(progress=False) as engine:
            ray_report = run_pipeline(inputs, str(tmp_path / "ray"), config, engine)
    finally:
        ray.shutdown()
    assert _outputs(str(tmp_path / "ray")) == _outputs(str(tmp_path / "local"))
    assert local_report["documents_out"] > 0
    assert {key: value for key, value in ray_report.items() if key != "outputs"} == \
        {key: value for key, value in local_report.items() if key != "outputs"}
