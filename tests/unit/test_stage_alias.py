"""Which registry alias /retrieve, /prerank and /rank serve: the configured one, never the first
alias in sort order."""

from __future__ import annotations

import dataclasses

import pytest

from configs import load_config
from serving.ingress import arm_aliases, stage_alias
from serving.schemas import FunnelArgs


def _args(variants: dict[str, str], alias: str = "") -> FunnelArgs:
    cfg = load_config("configs/tiny.yaml")
    ab = dataclasses.replace(cfg.abtest, arms=dict.fromkeys(variants, 100 // len(variants)), variants=variants)
    return FunnelArgs(data_dir="x", serve=dataclasses.replace(cfg.serve, alias=alias), abtest=ab)


def test_champion_is_served_when_an_arm_serves_it_even_if_another_sorts_first():
    args = _args({"control": "funnel@champion", "treatment": "funnel@challenger"})
    assert arm_aliases(args) == ["challenger", "champion"] and stage_alias(args) == "champion"


def test_the_configured_alias_is_loaded_and_served():
    args = _args({"control": "popularity", "treatment": "funnel@challenger"}, alias="champion")
    assert arm_aliases(args) == ["challenger", "champion"] and stage_alias(args) == "champion"
    assert stage_alias(_args({"control": "popularity", "treatment": "funnel@challenger"})) == "challenger"


def test_two_arm_aliases_without_champion_must_be_named():
    with pytest.raises(ValueError, match=r"serve\.alias"):
        stage_alias(_args({"control": "funnel@a", "treatment": "funnel@b"}))
    assert stage_alias(_args({"control": "funnel@a", "treatment": "funnel@b"}, alias="b")) == "b"


def test_several_ingress_replicas_need_the_shared_state(tmp_path):
    from configs import ServeConfig
    from serving.app import build_app
    from serving.schemas import FunnelArgs

    (tmp_path / "token").write_text("t\n")
    with pytest.raises(ValueError, match="state_backend: actor"):
        build_app(FunnelArgs(data_dir=str(tmp_path), serve=ServeConfig(ingress_replicas=2,
                                                                       token_file=str(tmp_path / "token"))))
    with pytest.raises(ValueError, match="state_sync_ms"):
        build_app(FunnelArgs(data_dir=str(tmp_path), serve=ServeConfig(
            ingress_replicas=2, state_backend="replicated", state_sync_ms=0, token_file=str(tmp_path / "token"))))
