"""Recipes under attack: mutated shipped recipes either validate or fail with a RecipeError naming file and key.

Every stage recipe in recipes/smollm2-135m/ is the starting point (data cards made absolute, outputs moved
to a temporary folder); hypothesis then adds unknown keys at random depths (string and non-string names),
swaps values for other types, deletes keys and whole sections, and plants nonsense values. Whatever comes
out, `load_recipe` may only succeed or raise `RecipeError` whose message starts with the recipe file and
the key path of the problem, never any other exception.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.recipe import _RESERVED_TRAINING_KEYS, HubSpec, LoraSpec, ModelSpec, QuantizationSpec
from rlhf_pipeline.stages import STAGE_NAMES, get_stage, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "smollm2-135m"
STAGE_RECIPES = sorted(p for p in RECIPES.glob("*.yaml") if "stages" not in yaml.safe_load(p.read_text()))
MAX_EXAMPLES = int(os.environ.get("RECIPE_FUZZ_EXAMPLES", "800"))  # ~10-20 s on a busy 2-core machine

# Values that are wrong whatever the stage: (key path, value, key path the error must name).
NONSENSE: list[tuple[tuple[str, ...], Any, str]] = [
    (("model", "lora", "r"), 0, "model.lora.r"),
    (("model", "lora", "r"), -4, "model.lora.r"),
    (("model", "lora", "lora_dropout"), 1.0, "model.lora.lora_dropout"),
    (("model", "quantization"), {"load_in_4bit": True, "load_in_8bit": True}, "model.quantization"),
    (("model", "dtype"), "float8", "model.dtype"),
    (("model", "name_or_path"), "  ", "model.name_or_path"),
    (("data", "train"), ["no_such_card_anywhere"], "data.train[0]"),
    (("data", "train"), [], "data.train"),
    (("data", "max_length"), 0, "data.max_length"),
    (("data", "eval_split"), 1.5, "data.eval_split"),
    (("data", "min_valid_fraction"), 0.0, "data.min_valid_fraction"),
    (("stage",), "ppo2", "stage"),
    (("stage",), None, "stage"),
    (("hub",), {"push": True}, "hub.repo_id"),
    (("hub",), {"token": "hf_notarealtoken"}, "hub.token"),
]
# Nonsense in the stage's own config section (`training`, `labelling`, `evaluation`).
NONSENSE_CONFIG: dict[str, list[tuple[str, Any]]] = {
    "sft": [("learning_rate", -1e-4), ("learning_rate", 0), ("learning_rate", math.nan),
            ("learning_rate", math.inf), ("num_train_epochs", -1), ("save_steps", 0), ("output_dir", "")],
    "rm": [("learning_rate", -3e-4), ("per_device_train_batch_size", 0), ("learning_rate", math.nan)],
    "prm": [("learning_rate", -1e-3), ("num_train_epochs", -1), ("per_device_train_batch_size", 0)],
    "ppo": [("response_length", 0), ("learning_rate", -1.0), ("kl_estimator", "k9"), ("cliprange", 2.0),
            ("reward_model_path", None), ("num_ppo_epochs", 0)],
    "label": [("num_samples", 1), ("pairs", "some"), ("min_gap", -1.0)],
    "dpo": [("beta", "strong"), ("learning_rate", -1e-4)],
    "kto": [("desirable_weight", "high"), ("learning_rate", math.nan)],
    "grpo": [("num_generations", "four"), ("learning_rate", 0)],
    "rloo": [("max_completion_length", "long"), ("learning_rate", -1.0)],
    "eval": [("policy", 7), ("max_new_tokens", "many")],
    "best-of-n": [("n_max", 0), ("n_values", [1, 8, 4]), ("n_values", [1, 32]), ("batch_size", 0)],
}


def _absolute_recipe(path: Path, tmp: Path) -> dict[str, Any]:
    """A shipped recipe whose data cards resolve from anywhere and whose outputs go to `tmp`."""
    data = yaml.safe_load(path.read_text())
    cards = REPO / "data_cards"
    stand_in = "math_shepherd" if data["stage"] == "prm" else "demo_preferences_warm"  # a shipped card of its kind
    for split in ("train", "eval"):
        data["data"][split] = [str(cards / (stand_in if "/" in ref else ref)) + ".yaml"
                               for ref in data["data"].get(split, [])]
    section = get_stage(data["stage"]).config_section
    data[section]["output_dir"] = str(tmp / "outputs" / data["stage"])
    for key in ("reward_model_path", "policy", "reward_model"):
        if key in data[section]:  # folders of earlier stages that do not exist here
            data[section][key] = str(tmp / "not-yet" / key)
    return data


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("fuzz-bases")
    found = {p.stem: _absolute_recipe(p, tmp) for p in STAGE_RECIPES if p.stem in STAGE_NAMES}  # one per stage
    assert set(found) == set(STAGE_NAMES)
    for name, data in found.items():  # the starting points are valid
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        assert load_recipe(path).stage == name
    return found


def _accepted_keys(stage: str, location: tuple[str, ...]) -> set[str]:
    """Keys the schema accepts in the mapping at `location`: an unknown key must be none of these."""
    spec = get_stage(stage)
    names = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    if location == ():
        return {"stage", "model", "data", spec.config_section, "hub", *spec.sections}
    table = {("model",): names(ModelSpec), ("model", "lora"): names(LoraSpec),
             ("model", "quantization"): names(QuantizationSpec), ("hub",): names(HubSpec),
             ("data",): names(__import__("rlhf_pipeline.data.cards", fromlist=["DataSpec"]).DataSpec),
             (spec.config_section,): set(spec.config_fields()) - set(_RESERVED_TRAINING_KEYS)}
    table |= {(section,): names(cls) for section, cls in spec.sections.items()}
    return table.get(location, set())


def _mappings(data: Any, location: tuple = ()) -> list[tuple]:
    """Every mapping inside the recipe (the recipe itself included), by location."""
    found = [location] if isinstance(data, dict) else []
    if isinstance(data, dict):
        for key, value in data.items():
            found += _mappings(value, (*location, key))
    return found


def _paths(data: Any, location: tuple = ()) -> list[tuple]:
    """Every key path (and list index) inside the recipe."""
    found: list[tuple] = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    for key, value in items:
        found.append((*location, key))
        found += _paths(value, (*location, key))
    return found


def _get(data: Any, location: tuple) -> Any:
    for key in location:
        data = data[key]
    return data


def _set(data: dict, location: tuple, value: Any) -> None:
    target = data
    for key in location[:-1]:
        if not isinstance(target.get(key) if isinstance(target, dict) else None, dict):
            target[key] = {}
        target = target[key]
    target[location[-1]] = value


def _name(key: Any) -> str:
    """How an error names a key: as written, or quoted when it is empty or not a string (as recipe.py does)."""
    return key if isinstance(key, str) and key.strip() else repr(key)


def _dotted(location: tuple) -> str:
    return ".".join(_name(key) for key in location)


def _top(location: tuple) -> str:
    return _name(location[0]) if location else ""


KEY_NAMES = st.one_of(
    st.text(alphabet=st.characters(categories=["Ll", "Lu", "Nd"], include_characters="_-.", max_codepoint=0x17F),
            min_size=1, max_size=14),
    st.sampled_from(["token", "api_key", "learnig_rate", "lora_rank", "quantisation", "pad_token", "r ", ""]),
    st.integers(-5, 5), st.booleans(), st.none(), st.floats(allow_nan=False, width=16),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


@st.composite
def mutated(draw: st.DrawFn, bases: dict[str, dict[str, Any]]) -> tuple[str, dict, list[tuple[str, tuple, Any]]]:
    """A base recipe with 1-3 mutations; returns (stage, recipe, [(kind, location, expected key)])."""
    stage = draw(st.sampled_from(sorted(bases)))
    data = copy.deepcopy(bases[stage])
    done: list[tuple[str, tuple, Any]] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["unknown_key", "known_key", "wrong_type", "delete", "nonsense",
                                     "section_shape"]))
        event(kind)
        if kind == "unknown_key":
            location = draw(st.sampled_from(_mappings(data)))
            key = draw(KEY_NAMES.filter(lambda k, loc=location: k not in _accepted_keys(stage, loc)))
            _get(data, location)[key] = draw(VALUES)
            done.append((kind, (*location, key), _dotted((*location, key))))
        elif kind == "known_key":  # any valid key, present or not, set to any value
            location = draw(st.sampled_from(_mappings(data)))
            accepted = sorted(_accepted_keys(stage, location))
            if not accepted:
                continue
            key = draw(st.sampled_from(accepted))
            _get(data, location)[key] = draw(VALUES)
            done.append((kind, (*location, key), None))
        elif kind == "wrong_type":
            location = draw(st.sampled_from(_paths(data)))
            old = _get(data, location)
            new = draw(VALUES.filter(lambda v, old=old: type(v) is not type(old)))
            _get(data, location[:-1])[location[-1]] = new
            done.append((kind, location, None))
        elif kind == "delete":
            location = draw(st.sampled_from(_paths(data)))
            container = _get(data, location[:-1])
            del container[location[-1]]
            done.append((kind, location, None))
        elif kind == "nonsense":
            section = get_stage(stage).config_section
            choices = [*NONSENSE, *[((section, key), value, f"{section}.{key}")
                                    for key, value in NONSENSE_CONFIG[stage]]]
            location, value, expected = draw(st.sampled_from(choices))
            _set(data, location, copy.deepcopy(value))
            done.append((kind, location, expected))
        else:  # a YAML list, scalar or null where a mapping is expected
            location = draw(st.sampled_from([loc for loc in _mappings(data) if loc]))
            value = draw(st.one_of(st.none(), st.lists(SCALARS, max_size=2), SCALARS))
            _get(data, location[:-1])[location[-1]] = value
            optional = location == ("model", "lora") and value is None  # lora: null is full fine-tuning
            done.append((kind, location, None if optional else _dotted(location)))
    return stage, data, done


def _check_error(err: RecipeError, path: Path, done: list[tuple[str, tuple, Any]]) -> None:
    message = str(err)
    assert err.file is not None and Path(err.file) == path, message
    assert err.key, f"no key named: {message}"
    assert message.startswith(f"{path}: {err.key}: "), message
    assert err.problem.strip(), message
    if any(location[:1] == ("stage",) for _, location, _ in done):
        return  # another stage reads every section differently; any key may be the first wrong one
    tops = {_top(location) for _, location, _ in done}
    assert any(err.key == top or err.key.startswith((f"{top}.", f"{top}[")) for top in tops), \
        f"{message} (mutated: {done})"


def test_mutated_recipes_fail_only_with_recipe_errors(bases: dict[str, dict[str, Any]], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    outcomes: collections.Counter[str] = collections.Counter()
    path = tmp_path / "recipe.yaml"

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.function_scoped_fixture])
    @given(case=mutated(bases))
    def check(case: tuple[str, dict, list[tuple[str, tuple, Any]]]) -> None:
        _, data, done = case
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
        outcomes["tried"] += 1
        try:
            load_recipe(path)
        except RecipeError as err:
            _check_error(err, path, done)
            outcomes["refused"] += 1
            event("refused")
            if len(done) == 1 and done[0][2] is not None:
                assert err.key.startswith(done[0][2]), f"{err} (expected the key {done[0][2]})"
        else:
            outcomes["valid"] += 1
            event("valid")
            assert len(done) != 1 or done[0][2] is None, f"accepted a recipe with {done}"

    check()
    with capsys.disabled():
        print(f"\nrecipe fuzz: {outcomes['tried']} mutated recipes tried, {outcomes['refused']} refused with a "
              f"RecipeError, {outcomes['valid']} valid")
    assert outcomes["tried"] >= MAX_EXAMPLES // 2
    assert outcomes["refused"] > outcomes["tried"] // 2


@pytest.mark.parametrize(("mutation", "key"), [
    (lambda d: d["model"].update(lora=[8, 16]), "model.lora"),
    (lambda d: d.update(data=None), "data"),
    (lambda d: d["training"].update({3: "x"}), "training.3"),
    (lambda d: d["model"]["lora"].update(r=0), "model.lora.r"),
    (lambda d: d.update(stage="ppo2"), "stage"),
])
def test_validate_cli_refuses_in_one_line(bases: dict[str, dict[str, Any]], tmp_path: Path, mutation: Any,
                                          key: str) -> None:
    data = copy.deepcopy(bases["sft"])
    mutation(data)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "rlhf_pipeline", "validate", str(path)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: {key}: ")


def test_validate_cli_bad_override_value_is_one_line(bases: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(bases["sft"]))
    result = subprocess.run([sys.executable, "-m", "rlhf_pipeline", "validate", str(path),
                             "training.learning_rate=[1e-4"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {path}: training.learning_rate: ")


@pytest.mark.parametrize(("mutation", "key", "words"), [
    (lambda d: d["model"].update(quantization=None), "model.quantization", "must be a mapping"),
    (lambda d: d["model"].update(quantization="4bit"), "model.quantization", "must be a mapping"),
    (lambda d: d["model"].update(lora="r16"), "model.lora", "must be a mapping"),
    (lambda d: d.update(hub=[1, 2]), "hub", "must be a mapping"),
    (lambda d: d["model"].update({"": 1}), "model.''", "unknown key"),
    (lambda d: d.update({None: 1}), "None", "unknown section"),
    (lambda d: d["training"].update(learning_rate=math.nan), "training.learning_rate", "finite"),
    (lambda d: d["training"].update(max_grad_norm=math.inf), "training.max_grad_norm", "finite"),
    (lambda d: d["data"].update(train=["missing_card"]), "data.train[0]", "no data card named 'missing_card'"),
])
def test_crashes_the_fuzzer_found_stay_fixed(bases: dict[str, dict[str, Any]], tmp_path: Path, mutation: Any,
                                             key: str, words: str) -> None:
    """Before the fix these raised AttributeError, passed silently, or named no key."""
    data = copy.deepcopy(bases["sft"])
    mutation(data)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert words in str(info.value)
