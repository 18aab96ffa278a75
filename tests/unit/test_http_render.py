"""The engine API's JSON answers: orjson where it can, json.dumps where it cannot."""

import json
import math

import pytest

from engine.http import _EngineJSON, _TotalJSON


def test_an_answer_is_compact_utf8_json():
    body = _EngineJSON({"name": "café ☕", "n": 3, "ok": True, "none": None}).body
    assert body == '{"name":"café ☕","n":3,"ok":true,"none":null}'.encode()


def test_what_orjson_refuses_still_renders():
    value = {"huge": 2**70, "lone": "\ud800", 1: "a key that is not a string"}
    body = _EngineJSON(value).body
    assert json.loads(body) == {"huge": 2**70, "lone": "\ud800", "1": "a key that is not a string"}


def test_a_user_route_s_nan_is_refused_not_turned_into_null():
    with pytest.raises(ValueError):
        _TotalJSON({"ratio": math.nan})
