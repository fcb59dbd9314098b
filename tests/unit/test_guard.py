"""The serving guard's pieces without Ray: the token, non-finite JSON, safe error bodies, auth_all."""

from __future__ import annotations

import json
import types

import pytest

from serving.guard import (
    TOKEN_ENV,
    ensure_token_file,
    non_finite_reason,
    read_token,
    token_matches,
    validation_error_body,
)


def test_the_token_comes_from_the_environment_or_a_0600_file(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="no API token"):
        read_token(tmp_path / "missing")
    path = ensure_token_file(tmp_path / "runs" / "serve_token")
    assert path.stat().st_mode & 0o777 == 0o600
    tok = read_token(path)
    assert len(tok) >= 32 and ensure_token_file(path).read_text().strip() == tok  # kept, not rotated
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert read_token(path) == "from-env"
    assert token_matches("abc", "Bearer abc") and not token_matches("abc", "abc")
    assert not token_matches("abc", "Bearer abd") and not token_matches("abc", None)


def test_non_finite_numbers_are_named_and_syntax_errors_left_to_the_app():
    assert "NaN" in non_finite_reason('{"k": NaN}')
    assert "Infinity" in non_finite_reason('[1, -Infinity]')
    assert "overflows" in non_finite_reason('{"ts": 1e999}')
    assert non_finite_reason('{"k": 1.5, "ts": 17}') is None
    assert non_finite_reason('{"k": ') is None


def test_validation_error_bodies_always_render():
    body = validation_error_body([{"type": "int_type", "loc": ("body", "k"), "msg": "x", "input": float("nan"),
                                   "ctx": {"error": ValueError("bad"), "raw": b"\xff"}, "url": "https://..."}])
    text = json.dumps(body, allow_nan=False)  # what the JSON response does; no exception
    assert "nan" in text and "url" not in body["detail"][0]


def test_auth_all_guards_every_endpoint_and_feedback_always():
    from fastapi import HTTPException

    from configs import ServeConfig
    from serving.app import Funnel

    cls = Funnel.func_or_class
    for auth_all in (False, True):
        me = types.SimpleNamespace(token="t0k", args=types.SimpleNamespace(serve=ServeConfig(auth_all=auth_all)))
        cls._auth(me, "Bearer t0k", required=True)
        with pytest.raises(HTTPException) as e:
            cls._auth(me, None, required=True)
        assert e.value.status_code == 401
        if auth_all:
            with pytest.raises(HTTPException):
                cls._auth(me, "Bearer nope")
        else:
            cls._auth(me, None)  # /recommend and the stages stay open unless serve.auth_all


def test_the_user_code_loop_setting_reaches_the_replicas_as_serves_own_env_var():
    """serve.user_code_thread: false (the default) → RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 in the
    replicas' runtime_env (Serve reads it when the replica process starts); true → Serve's default."""
    from configs import ServeConfig
    from serving.app import replica_runtime_env

    assert ServeConfig().user_code_thread is False
    env = replica_runtime_env(ServeConfig())["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    assert replica_runtime_env(ServeConfig(user_code_thread=True)) == {}
    # Serve's throughput mode defaults the loop to the HTTP one: user_code_thread still decides it
    env = replica_runtime_env(ServeConfig(user_code_thread=True, throughput_optimized=True))["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}
    env = replica_runtime_env(ServeConfig(throughput_optimized=True))["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
