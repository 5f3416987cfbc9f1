"""Tests for jaxckpt.config_strings: the config/command-line string forms, parsed into Python values."""

import ml_collections
import pytest

from jaxckpt import config_strings
from jaxckpt.grafting.adapters import normalize_adapters
from jaxckpt.grafting.mapping import normalize_mapping
from jaxckpt.train import optim
from jaxckpt.weights.foreign import rename_rules


@pytest.mark.parametrize("text, expected", [
    ("bert:encoder", {"bert": "encoder"}),
    (" bert/ : encoder , cls:head ", {"bert/": "encoder", "cls": "head"}),
    (":backbone", {"": "backbone"}),
    ("", None),
    ("  ", None),
    (None, None),
    ({"a/b": "c"}, {"a/b": "c"}),
])
def test_parse_mapping(text, expected):
    assert config_strings.parse_mapping(text) == expected


def test_a_parsed_mapping_is_what_graft_takes():
    # The separators around a prefix are the graft's to strip, for strings and dicts alike.
    parsed = config_strings.parse_mapping(" bert/ : encoder , cls:head ")
    assert normalize_mapping(parsed) == (("bert", "encoder"), ("cls", "head"))
    with pytest.raises(ValueError, match="target prefix"):
        normalize_mapping(config_strings.parse_mapping("a:x,b:x"))


@pytest.mark.parametrize("text, error", [
    ("bert", "one ':'"),
    ("a:b:c", "one ':'"),
    ("a:b,", "one ':'"),
    ("a:x,a:y", "source prefix"),
])
def test_parse_mapping_errors(text, error):
    with pytest.raises(ValueError, match=error):
        config_strings.parse_mapping(text)


def test_parse_patterns():
    assert config_strings.parse_patterns("") == ()
    assert config_strings.parse_patterns(None) == ()
    assert config_strings.parse_patterns(" encoder , fusion ") == ("encoder", "fusion")
    # A regex with a comma needs a sequence, which passes through.
    assert config_strings.parse_patterns(("a{1,2}",)) == ("a{1,2}",)
    assert optim.freeze_patterns(config_strings.parse_patterns(("a{1,2}",))) == ("a{1,2}",)


def test_parse_adapters():
    assert config_strings.parse_adapters("emb:resize, pos:interpolate") == {"emb": "resize", "pos": "interpolate"}
    # The adapter follows the last ':', so a regex may hold colons.
    assert config_strings.parse_adapters("(?:a|b)/w:resize") == {"(?:a|b)/w": "resize"}
    assert config_strings.parse_adapters(None) == {}
    with pytest.raises(ValueError, match="regex:resize"):
        config_strings.parse_adapters("resize")
    with pytest.raises(ValueError, match="unknown"):
        normalize_adapters(config_strings.parse_adapters("head:pad"))


def test_parse_lr_multipliers():
    assert config_strings.parse_lr_multipliers("(?:enc|dec)/kernel:0.5") == (("(?:enc|dec)/kernel", 0.5),)
    assert config_strings.parse_lr_multipliers("head:10, encoder/Dense_0:0.1") == (
        ("head", 10.0), ("encoder/Dense_0", 0.1))
    assert config_strings.parse_lr_multipliers("") == ()
    # Python values (a config file may set them) pass through, for the optimizer to check.
    assert config_strings.parse_lr_multipliers({"head": 10}) == (("head", 10),)
    assert optim.multiplier_rules(config_strings.parse_lr_multipliers([("head", "2")])) == (("head", 2.0),)


@pytest.mark.parametrize("spec, message", [
    ("a:b:c", "'c' is not a number"),
    ("head:fast", "'fast' is not a number"),
    ("head", "must look like 'regex:multiplier'"),
    (":0.1", "must look like 'regex:multiplier'"),
    ("head:-1", "must be finite and >= 0"),
    ("head[:0.1", "not a valid regex"),
])
def test_bad_multiplier_strings_give_clear_errors(spec, message):
    # Syntax errors come from the parser, meaning errors from the optimizer's own check.
    with pytest.raises(ValueError, match=message):
        optim.multiplier_rules(config_strings.parse_lr_multipliers(spec))


def test_parse_rename():
    rules = config_strings.parse_rename(r"fc1\.weight=>Dense_0/kernel; fc(\d)\.bias=>Dense_\1/bias;")
    assert rules == ((r"fc1\.weight", "Dense_0/kernel"), (r"fc(\d)\.bias", r"Dense_\1/bias"))
    assert rename_rules(rules) == rules
    assert config_strings.parse_rename("") == ()
    with pytest.raises(ValueError, match="must look like 'regex=>path'"):
        config_strings.parse_rename("fc1.weight:Dense_0/kernel")
    with pytest.raises(ValueError, match="empty side"):
        rename_rules(config_strings.parse_rename("=>Dense_0/kernel"))


def test_checkpoint_options_read_a_config_section():
    ck = ml_collections.ConfigDict({"mapping": "bert:encoder", "skip": "head,.*/bias", "adapters": "",
                                    "rename": r"a\.w=>a/kernel", "strict": True})
    assert config_strings.checkpoint_options(ck) == {
        "mapping": {"bert": "encoder"}, "skip": ("head", ".*/bias"), "adapters": None,
        "rename": ((r"a\.w", "a/kernel"),)}
    # A section without the weights-file fields (older configs) is fine.
    assert config_strings.checkpoint_options({"mapping": "", "skip": ""}) == {
        "mapping": None, "skip": (), "adapters": None, "rename": None}
