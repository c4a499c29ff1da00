"""``--prediction-type`` (and ``SDREPL_PREDICTION_TYPE``): parsed once, reaching the model's scheduler for
single files and folders alike, and shown in ``status`` and the PNG metadata."""

from __future__ import annotations

import argparse

import pytest

from sdrepl.config import Settings, add_shared_options, parse_prediction_type, settings_from_args
from sdrepl.core.errors import UsageError
from sdrepl.core.generation import GenerationJob, prediction_field, run_generation
from sdrepl.core.outputs import OutputFolder
from sdrepl.core.pnginfo import read_png_parameters
from sdrepl.core.prompt import StaticLookup


def parse(argv, monkeypatch, env=None):
    for key in ("SDREPL_PREDICTION_TYPE",):
        monkeypatch.delenv(key, raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    add_shared_options(parser)
    return settings_from_args(parser.parse_args(argv))


def test_the_option_and_the_variable(monkeypatch):
    assert parse([], monkeypatch).prediction_type is None  # guessed
    assert parse(["--prediction-type", "v_prediction"], monkeypatch).prediction_type == "v_prediction"
    assert parse([], monkeypatch, {"SDREPL_PREDICTION_TYPE": "epsilon"}).prediction_type == "epsilon"
    assert parse_prediction_type("V") == "v_prediction"
    with pytest.raises(UsageError, match="expected epsilon or v_prediction"):
        parse(["--prediction-type", "flow"], monkeypatch)
    settings = Settings(prediction_type="v_prediction")
    args = settings.daemon_args()
    assert args[args.index("--prediction-type") + 1] == "v_prediction"  # an auto-started daemon gets it
    assert "--prediction-type" not in Settings().daemon_args()


@pytest.fixture(scope="module")
def sd2_single_file(tmp_path_factory):
    from sdrepl.core.checkpoint_export import export_single_file

    return export_single_file("tiny-sd2", tmp_path_factory.mktemp("sd2") / "tiny-sd2.safetensors")


@pytest.mark.parametrize("given, expected", [(None, "epsilon"), ("v_prediction", "v_prediction"),
                                             ("epsilon", "epsilon")])
def test_a_single_file_s_prediction_type(sd2_single_file, given, expected):
    from sdrepl.core.models import load_model

    model = load_model(str(sd2_single_file), device="cpu", dtype="fp32", prediction_type=given)
    assert model.prediction_type == expected and model.describe()["prediction_type"] == expected
    assert model.pipe.scheduler.config.prediction_type == expected


def test_the_metadata_and_status_say_which_was_used(tmp_path):
    from sdrepl.core.models import load_model
    from sdrepl.core.status_text import format_status

    model = load_model("tiny-sd2", device="cpu", dtype="fp32", prediction_type="v_prediction")
    assert prediction_field(model) == {"Prediction type": "v_prediction"}
    job = GenerationJob("a tree", "", 2, 7.0, 1, 64, 64, "Euler", 1, 1)
    result = run_generation(model, StaticLookup(), job, OutputFolder(tmp_path / "out"))
    text = read_png_parameters(result["images"][0]["path"])
    assert text.endswith("Model: tiny-sd2, Prediction type: v_prediction")
    assert model.pipe.scheduler.config.prediction_type == "v_prediction"  # the sampler kept it
    line = format_status({"model": model.describe(), "state": "ready"})
    assert "predicts v_prediction" in line


def test_sd1_metadata_is_unchanged(tiny_model):
    assert prediction_field(tiny_model) == {}
