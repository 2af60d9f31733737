"""The registry: names, overrides and errors a person can act on."""
import pytest

import edgevits


def test_unknown_model_name_suggests_close_ones():
    with pytest.raises(KeyError, match="swiftformer_xs"):
        edgevits.create_model("swiftformer_xss")


def test_misspelled_override_fails_at_once_and_names_the_field():
    with pytest.raises(TypeError, match="num_classes"):
        edgevits.create_model("swiftformer_xs", num_clases=10)


def test_invalid_override_value_is_rejected():
    with pytest.raises(ValueError, match="attention_revision"):
        edgevits.create_model("swiftformer_xs", attention_revision="v3")


def test_list_models_filters_by_pattern():
    assert edgevits.list_models("swiftformer_*") == sorted(
        ["swiftformer_xs", "swiftformer_s", "swiftformer_l1", "swiftformer_l3"])
