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


def test_a_model_registered_by_the_user_sits_beside_the_built_in_ones():
    # run in a fresh interpreter: registering before any lookup once hid every built-in variant
    import subprocess
    import sys
    code = ("import dataclasses, edgevits\n"
            "from edgevits.registry import register_model, get_entry\n"
            "from edgevits.models import swiftformer as sf\n"
            "register_model('my_swift', sf.MODEL, dataclasses.replace(sf.VARIANTS['swiftformer_xs'].config, "
            "num_classes=7), family='swiftformer')\n"
            "names = edgevits.list_models()\n"
            "assert 'my_swift' in names and 'swiftformer_xs' in names and len(names) == 18, names\n"
            "assert edgevits.create_model('my_swift').num_classes == 7\n"
            "try:\n"
            "    register_model('efficientvit_m0', sf.MODEL, sf.VARIANTS['swiftformer_xs'].config, family='x')\n"
            "except ValueError as e:\n"
            "    assert 'already registered' in str(e)\n"
            "else:\n"
            "    raise SystemExit('a built-in name was registered twice')\n")
    subprocess.run([sys.executable, "-c", code], check=True)
