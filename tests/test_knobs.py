"""Knobs as data (proxyclip/knobs.py): every kind's checks and typed outputs, and every declared
knob of every registered method and post-process, parametrized from the registries (a new method
or post-process is covered by itself): bad values named, unknown names listed, YAMLs that set
exactly the declared knobs."""

import math

import pytest
from omegaconf import OmegaConf

from conftest import tiny_config
from proxyclip.config import CONF_DIR
from proxyclip.knobs import DECISION, KINDS, SWITCHES, Knob
from proxyclip.methods import METHODS
from proxyclip.postprocess import POSTPROCESSES
from proxyclip.resolve import check_method_node, decode_spec


def check_error(knob, value, where=""):
    """The one-line error of a refused value: names the field and the value, says what is expected."""
    with pytest.raises(ValueError) as e:
        knob.check(value, where)
    msg = str(e.value)
    label = f"{where}.{knob.name}" if where else knob.name
    assert "\n" not in msg and msg.startswith(f"{label} must be {knob.expected()}, got {value!r}"), msg
    return msg


# ---------------------------------------------------------------------------------------------- each kind
def test_float_knob():
    k = Knob("gamma", "float", "scale", low=0, low_open=True, high=10)
    assert k.check(3) == 3.0 and type(k.check(3)) is float  # an int becomes a float
    assert k.check(2.5) == 2.5 and k.check(10) == 10.0  # high bound closed: 10 is in
    for bad in (0, 0.0, -1.0, 10.5, float("nan"), float("inf"), -float("inf"), True, False, "3", None, [3.0]):
        check_error(k, bad, "method")
    assert k.expected() == "a number > 0 and <= 10"
    assert k.describe() == "gamma (a number > 0 and <= 10): scale"
    closed_low = Knob("beta", "float", "shift", low=0)
    assert closed_low.check(0) == 0.0 and closed_low.expected() == "a number >= 0"
    check_error(closed_low, -1e-9)
    open_high = Knob("p", "float", "a share", low=0, high=1, high_open=True)
    assert open_high.check(0.999) == 0.999 and open_high.expected() == "a number >= 0 and < 1"
    check_error(open_high, 1.0)
    unbounded = Knob("x", "float", "anything finite")
    assert unbounded.check(-1e30) == -1e30 and unbounded.expected() == "a number"
    check_error(unbounded, float("nan"))


def test_int_knob():
    k = Knob("steps", "int", "iterations", low=0, high=20, high_open=True)
    assert k.check(0) == 0 and k.check(19) == 19
    assert k.check(4.0) == 4 and type(k.check(4.0)) is int  # an integral float becomes an int
    for bad in (-1, 20, 2.5, float("nan"), float("inf"), True, "3", None):
        check_error(k, bad, "postprocess")
    assert k.expected() == "an integer >= 0 and < 20"
    assert Knob("n", "int", "open low", low=1, low_open=True).expected() == "an integer > 1"
    check_error(Knob("n", "int", "open low", low=1, low_open=True), 1)


def test_bool_knob():
    k = Knob("residual", "bool", "switch")
    assert k.check(True) is True and k.check(False) is False
    for bad in (1, 0, 1.0, "true", "false", None):  # bool vs int: 1 and 0 are not switches
        check_error(k, bad, "method")
    assert k.expected() == "true or false"


def test_choice_knob():
    k = Knob("feature", "choice", "which tensor", choices=("tokens", "q", "k"))
    assert k.check("q") == "q"
    for bad in ("v", "Q", "", 1, None, True):
        check_error(k, bad)
    assert k.expected() == "one of tokens, q, k"
    with pytest.raises(ValueError, match="knob feature: a choice knob needs its choices"):
        Knob("feature", "choice", "no choices")


def test_ints_knob():
    k = Knob("dilations", "ints", "offsets", low=1, high=32)
    assert k.check([8, 16]) == [8, 16] and k.check((1, 2)) == [1, 2] and type(k.check((1, 2))) is list
    assert k.check([1, 32]) == [1, 32]  # both bounds closed
    for bad in ([], [0], [33], [8, 2.0], [8, True], "8", 8, None, [None]):
        check_error(k, bad, "postprocess")
    assert check_error(k, [], "postprocess").endswith("(empty)")
    assert k.expected() == "a list of integers >= 1 and <= 32"


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match=r"knob x: kind 'str' is not one of " + ", ".join(KINDS)):
        Knob("x", "str", "no such kind")


# ---------------------------------------------------------------------------------------------- registries
def bad_values(knob):
    """Values ``knob`` must refuse: the wrong type, and just outside each bound."""
    out = ["not-a-choice"] if knob.kind == "choice" else ["abc"]
    if knob.kind in ("float", "int"):
        out.append(True)
        if knob.kind == "float":
            out.append(float("nan"))
        if knob.low is not None:
            out.append(knob.low if knob.low_open else knob.low - 1)
        if knob.high is not None:
            out.append(knob.high if knob.high_open else knob.high + 1)
    if knob.kind == "bool":
        out.append(1)
    if knob.kind == "ints":
        out += [[], [1.5]] + ([[int(knob.low) - 1]] if knob.low is not None else [])
    return out


METHOD_KNOBS = [(m.name, k) for m in METHODS.values() for k in m.all_knobs]
POST_KNOBS = [(p.name, k) for p in POSTPROCESSES.values() for k in p.knobs]


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


@pytest.mark.parametrize("method,knob", METHOD_KNOBS, ids=[f"{m}-{k.name}" for m, k in METHOD_KNOBS])
def test_every_method_knob_decodes_and_refuses_bad_values(cfg, method, knob):
    spec = decode_spec(cfg, method=method)
    default = spec.params()[knob.name]
    assert knob.check(default) == default  # the YAML's / protocol's default is valid and typed
    again = decode_spec(cfg, method=method, **{knob.name: default})
    assert again == spec
    for bad in bad_values(knob):
        with pytest.raises(ValueError, match=rf"^{knob.name} must be"):
            decode_spec(cfg, method=method, **{knob.name: bad})


@pytest.mark.parametrize("method,knob", [(m, k) for m, k in METHOD_KNOBS if k.low is not None and k.name != "prob_thd"],
                         ids=lambda x: x if isinstance(x, str) else x.name)
def test_a_bad_value_in_the_config_names_its_field(method, knob):
    """``method.<knob>=`` below its bound: the error names ``method.<knob>`` (``protocol.prob_thd``)."""
    low = knob.low if knob.low_open else knob.low - 1
    if knob.kind == "ints":  # a list with one item below the bound
        low = f"[{int(low)}]"
    where = "method"
    with pytest.raises(ValueError, match=rf"^{where}.{knob.name} must be {knob.expected()}"):
        decode_spec(tiny_config(f"method={method}", f"{where}.{knob.name}={low}"))


def test_a_bad_prob_thd_in_the_protocol_is_named():
    with pytest.raises(ValueError, match=r"^protocol.prob_thd must be a number >= 0 and <= 1, got 1.5"):
        decode_spec(tiny_config("protocol.prob_thd=1.5"))


@pytest.mark.parametrize("method", list(METHODS))
def test_an_unknown_knob_lists_the_methods_knobs(cfg, method):
    with pytest.raises(ValueError) as e:
        decode_spec(cfg, method=method, not_a_knob=1.0)
    msg = str(e.value)
    assert f"method {method} has no parameter(s) ['not_a_knob']" in msg
    for knob in METHODS[method].all_knobs:
        assert knob.describe() in msg
    others = {k.name for m in METHODS.values() for k in m.knobs} - set(METHODS[method].knob_names)
    for name in others:  # another method's knob is unknown here too
        with pytest.raises(ValueError, match=rf"method {method} has no parameter\(s\) \['{name}'\]"):
            decode_spec(cfg, method=method, **{name: 1.0})


@pytest.mark.parametrize("method", list(METHODS))
def test_an_appended_method_field_is_refused(method):
    cfg = tiny_config(f"method={method}", "+method.gama=2")
    with pytest.raises(ValueError, match=rf"^method.gama is not a setting of method {method}; its settings: "):
        decode_spec(cfg)
    node = OmegaConf.to_container(cfg.method)
    with pytest.raises(ValueError, match="method.gama"):
        check_method_node(node, METHODS[method])
    del node["gama"]
    check_method_node(node, METHODS[method])


@pytest.mark.parametrize("post,knob", POST_KNOBS, ids=[f"{p}-{k.name}" for p, k in POST_KNOBS])
def test_every_postprocess_setting_refuses_bad_values(cfg, post, knob):
    default = decode_spec(cfg, postprocess=post).postprocess_settings[knob.name]
    assert knob.check(default) == default
    for bad in bad_values(knob):
        with pytest.raises(ValueError, match=rf"^postprocess.{knob.name} must be"):
            decode_spec(cfg, postprocess={"name": post, knob.name: bad})
    with pytest.raises(ValueError, match=rf"postprocess {post} has no setting\(s\) \['stepz'\].*{knob.name}"):
        decode_spec(cfg, postprocess={"name": post, "stepz": 1})


# ---------------------------------------------------------------------------------------------- YAMLs
def _yaml(group, name):
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
    node.pop("defaults", None)
    return node


def test_conf_method_holds_the_registered_methods():
    assert {p.stem for p in (CONF_DIR / "method").glob("*.yaml")} == set(METHODS)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_yaml_sets_exactly_its_knobs(method):
    yaml = _yaml("method", method)
    meth = METHODS[method]
    assert set(yaml) == {"name", "logit_scale"} | {k.name for k in SWITCHES + meth.knobs}
    assert yaml["name"] == method
    for knob in SWITCHES + meth.knobs + DECISION[:1]:
        assert knob.check(yaml[knob.name], "method") == yaml[knob.name]


@pytest.mark.parametrize("post", list(POSTPROCESSES))
def test_each_postprocess_has_its_own_preset(post):
    yaml = _yaml("postprocess", post)
    assert yaml == {"name": post, **{k.name: yaml[k.name] for k in POSTPROCESSES[post].knobs}}
    for knob in POSTPROCESSES[post].knobs:
        assert knob.check(yaml[knob.name], "postprocess") == yaml[knob.name]


def test_knob_docs_are_one_line_and_sliders_inside_bounds():
    for owner, knob in METHOD_KNOBS + POST_KNOBS:
        assert knob.doc and "\n" not in knob.doc, (owner, knob.name)
        if knob.slider is not None:
            lo, hi, step = knob.slider
            assert lo < hi and step > 0 and math.isfinite(hi)
            for v in (lo, hi):  # both ends valid, except an open bound the slider starts at
                assert knob._in_range(v) or (v == knob.low and knob.low_open), (owner, knob.name, v)
