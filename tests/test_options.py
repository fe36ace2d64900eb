"""MergeOptions: every option says whether it changes the output's bytes, and the stage identity derived
from it is the one earlier versions computed (stage folders written before stay up to date)."""

from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.core.sizes import parse_size
from mergesmith.pipeline.options import MergeOptions, output_identity
from mergesmith.pipeline.stages import _sha


def test_every_option_is_classified():
    for f in fields(MergeOptions):
        assert isinstance(f.metadata.get("output"), bool), (
            f"MergeOptions.{f.name}: use output() or run_only()"
        )
        if f.metadata["output"]:
            assert callable(f.metadata["identity"]), f.name


def test_run_only_options_leave_the_identity_alone():
    base = output_identity(MergeOptions())
    changed = MergeOptions(
        memory_limit="1G", workers=3, device="cuda", backend="torch", strict=True, quiet=True, overwrite=True,
        force=True, intermediate_dir="/x",
    )  # fmt: skip
    assert output_identity(changed) == base


@pytest.mark.parametrize(
    ("options", "golden"),
    [  # hashes computed by the version before MergeOptions, from its hand-written options dict
        (MergeOptions(), "87d652540f613377be097e749a2dfbeec0bfbb538f52ba56c3a29605d67617e6"),
        (
            MergeOptions(random_seed=7, out_shard_size="1M", copy_tokenizer=False, allow_crimes=True),
            "512fd2198ac32a4362a45d2d7a4358a84f44e49ec3f90219110cbb72fc300b49",
        ),
    ],
)
def test_stage_identity_is_unchanged(options, golden):
    assert _sha({**output_identity(options), "mergesmith": "0.1.0"}) == golden


@settings(max_examples=60, deadline=None)
@given(
    seed=st.one_of(st.none(), st.integers(0, 2**32)),
    shard=st.sampled_from(["5G", "1M", "300K", 4096]),
    tokenizer=st.booleans(),
    card=st.booleans(),
    crimes=st.booleans(),
)
def test_identity_matches_the_old_formula(seed, shard, tokenizer, card, crimes):
    old = {"random_seed": seed or 0, "out_shard_size": parse_size(shard), "copy_tokenizer": tokenizer}
    old["write_model_card"] = card
    if crimes:
        old["allow_crimes"] = True
    opts = MergeOptions(
        random_seed=seed,
        out_shard_size=shard,
        copy_tokenizer=tokenizer,
        write_model_card=card,
        allow_crimes=crimes,
    )
    assert output_identity(opts) == old


def test_output_format_enters_the_identity_when_not_the_default():
    assert output_identity(MergeOptions(out_format="bitnet"))["out_format"] == "bitnet"
