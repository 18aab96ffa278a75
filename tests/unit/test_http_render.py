"""The engine API's JSON answers: orjson where it can, json.dumps where it cannot."""

import json

from engine.http import _TotalJSON


def test_an_answer_is_compact_utf8_json():
    body = _TotalJSON({"name": "café ☕", "n": 3, "ok": True, "none": None}).body
    assert body == '{"name":"café ☕","n":3,"ok":true,"none":null}'.encode()


def test_what_orjson_refuses_still_renders():
    value = {"huge": 2**70, "lone": "\ud800", 1: "a key that is not a string"}
    body = _TotalJSON(value).body
    assert json.loads(body) == {"huge": 2**70, "lone": "\ud800", "1": "a key that is not a string"}
