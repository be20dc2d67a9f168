"""The value checks shared across modules: the CLIs' argument types (dit_fast.cli_args.converted) and the named
option checks of dit_fast.transport (check_choice), each message naming what was expected and what came."""
from __future__ import annotations

import argparse

import pytest

from dit_fast import cli, cli_args, sample_cli
from dit_fast.flow_sampling import build_flow_table
from dit_fast.transport import create_transport

PARSE_ERRORS = [  # (argument type, text, the usage error): text that does not convert, then a value out of range
    (cli._int_at_least(1), "x", "expected an integer >= 1, got 'x'"),
    (cli._int_at_least(1), "0", "expected an integer >= 1, got 0"),
    (cli._positive_float, "1e", "expected a positive number, got '1e'"),
    (cli._positive_float, "inf", "expected a positive number, got 'inf'"),
    (sample_cli._labels_arg, "1,b", "expected comma-separated class labels like 207,360, got '1,b'"),
    (sample_cli._labels_arg, " , ", "expected at least one class label"),
    (cli_args.finite_float, "one", "expected a number, got 'one'"),
    (cli_args.finite_float, "nan", "expected a finite number, got nan"),
    (cli_args.non_negative_float, "x", "expected a number, got 'x'"),
    (cli_args.non_negative_float, "-1", "expected a finite number >= 0, got -1"),
    (cli_args.positive_int, "1.5", "expected a positive integer, got '1.5'"),
    (cli_args.positive_int, "0", "expected a positive integer, got 0"),
    (sample_cli._cfg_interval_arg, "a,b", "expected a time S or a pair LOW,HIGH of times, got 'a,b'"),
    (sample_cli._cfg_interval_arg, "0.5,0.1", "expected a time S or a pair LOW,HIGH of finite times with LOW <= "
                                              "HIGH, got '0.5,0.1'"),
]


@pytest.mark.parametrize("parse, text, message", PARSE_ERRORS)
def test_argument_types_name_what_was_expected_and_what_came(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        parse(text)
    assert str(e.value) == message


def test_argument_types_convert_good_values():
    assert cli._int_at_least(0)("0") == 0 and cli._positive_float("2.5") == 2.5
    assert sample_cli._labels_arg("3, 1,") == [3, 1] and cli_args.finite_float("-1.5") == -1.5
    assert sample_cli._cfg_interval_arg("0.2") == (0.2, 1.0) and sample_cli._cfg_interval_arg("0,0.5") == (0.0, 0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(path_type="linear"), "path_type must be one of ('Linear', 'GVP', 'VP'), got 'linear'"),
    (dict(prediction="eps"), "prediction must be one of ('velocity', 'noise', 'score'), got 'eps'"),
    (dict(loss_weight="noise"), "loss_weight must be one of (None, 'velocity', 'likelihood'), got 'noise'"),
])
def test_create_transport_names_a_bad_option(kwargs, message):
    with pytest.raises(ValueError) as e:
        create_transport(**kwargs)
    assert str(e.value) == message


@pytest.mark.parametrize("kwargs, start", [
    (dict(path_type="VPP"), "path_type must be one of ('Linear', 'GVP', 'VP'), got 'VPP'"),
    (dict(prediction="x0"), "prediction must be one of ('velocity', 'noise', 'score'), got 'x0'"),
    (dict(diffusion_form="cosine"), "diffusion_form must be one of ('constant', "),
    (dict(last_step="Heun"), "last_step must be one of (None, 'Mean', 'Tweedie', 'Euler'), got 'Heun'"),
])
def test_the_flow_sampler_names_a_bad_option(kwargs, start):
    with pytest.raises(ValueError) as e:
        build_flow_table(num_steps=4, **kwargs)
    assert str(e.value).startswith(start)
