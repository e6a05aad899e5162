"""The VictoriaMetrics sink's line protocol: the batch formatter against the generic one.

``batch_lines`` formats a batch from the store's tuples with orjson and one loop over
the top-level fields; it must write exactly the lines (and count exactly the skipped
values) of the generic recursive ``_fields`` over ``json.loads`` -- what the sink wrote
before -- for every shape of ``data``.  And odd tags must reach a real VictoriaMetrics
as they are.
"""

from __future__ import annotations

import json
import time

import httpx

from node.registry import DeviceContext, Registry
from node.storage import victoria as vmsink
from node.storage.enrich import Row, batch_of
from node.storage.source import RawRow
from tests.storage.conftest import VmServer

DATAS = [
    '{"temp":20.5,"hum":40,"ok":true,"off":false,"s":"text","n":null,"l":[1,2]}',
    '{"gps":{"lat":1.5,"lon":-2,"fix":{"q":3,"deep":{"x":1}}},"":7,"a b/c":1e300}',
    '{"big":12345678901234567890123,"neg":-9223372036854775808,"tiny":5e-324}',
    '{"s":"\\ud800","v":1}',  # a lone surrogate escape: orjson refuses it, json takes it
    "42",
    "3.25",
    "true",
    '"a string"',
    "null",
    "[1,2,3]",
    "{}",
    '{"1st":1,"é":2,"x":{"":3}}',
]


def generic_line(row: Row) -> tuple[str, int]:
    """The first version's formatting: json.loads and the recursive _fields."""
    fields: list[str] = []
    skipped = vmsink._fields(json.loads(row.data_json), "", fields, 0)
    fields.append(f"iotnode_seq={row.seq}")
    prefix = vmsink._line_prefix(row.device_id, row.ctx)
    return f"{prefix} {','.join(fields)} {vmsink.sample_ms(row)}", skipped


def same_sample(text: str) -> str:
    """The line with an integer beyond 64 bits written as the float VictoriaMetrics parses it to:
    orjson (some versions) gives that float, json the digits -- the same sample value."""
    head, fields, when = text.rsplit(" ", 2)
    out = []
    for field in fields.split(","):
        name, value = field.split("=", 1)
        if value.lstrip("-").isdigit() and abs(int(value)) >= 2**64:
            value = repr(float(value))
        out.append(f"{name}={value}")
    return f"{head} {','.join(out)} {when}"


def registry() -> Registry:
    return Registry(
        {
            "d,1=x\\": DeviceContext(
                "d,1=x\\", "thermo v2", "c=1", "r,1", "site", 1.0, 2.0, "u0abc", {"k": "v"}
            ),
            "d2": DeviceContext("d2", "meter", "", "eu\nwest\r", "", None, None, ""),
        }
    )


def rows(now: float) -> list[RawRow]:
    devices = ["d,1=x\\", "d2", "ghost"]
    out: list[RawRow] = []
    for i in range(len(DATAS) * 3):
        ts = [None, now - i, now - 2 * 365 * 86400][i % 3]  # none, a device time, one too far off
        device = devices[i // len(DATAS)]  # every device with every shape of data
        out.append((i + 1, device, i, ts, now + i * 0.001, DATAS[i % len(DATAS)]))
    return out


def test_batch_lines_are_the_generic_lines_for_every_shape_of_data() -> None:
    batch = batch_of(rows(1_796_083_200.0), registry())
    lines, skipped = vmsink.batch_lines(batch)
    generic = [generic_line(r) for r in batch.rows]
    assert [same_sample(t) for t in lines] == [same_sample(t) for t, _ in generic]
    assert skipped == sum(n for _, n in generic)
    assert [(same_sample(t), n) for t, n in map(vmsink.line, batch.rows)] == [
        (same_sample(t), n) for t, n in generic
    ]
    assert lines[0].startswith("thermo_v2,device_id=d\\,1\\=x\\\\,type=thermo\\ v2,class=c\\=1,region=r\\,1,")
    d2_gps = lines[len(DATAS) + 1]
    assert d2_gps.startswith("meter,device_id=d2,type=meter,region=eu\\ west\\  gps_lat=1.5,")
    assert "\n" not in "".join(lines)
    assert lines[0].rsplit(" ", 2)[1] == "temp=20.5,hum=40,ok=1,off=0,iotnode_seq=0"


def test_odd_tags_and_fields_reach_victoriametrics_as_written(vm: VmServer) -> None:
    now = time.time()
    batch = batch_of(rows(now), registry())
    lines, _ = vmsink.batch_lines(batch)
    httpx.post(f"{vm.url}/write?precision=ms", content="\n".join(lines) + "\n", timeout=10).raise_for_status()
    vm.flush()
    got = httpx.get(
        f"{vm.url}/api/v1/export", params={"match[]": '{__name__="thermo_v2_gps_lat"}'}, timeout=10
    )
    series = [json.loads(x) for x in got.text.splitlines() if x.strip()]
    assert len(series) == 1
    assert {k: series[0]["metric"][k] for k in ("device_id", "type", "class", "region")} == {
        "device_id": "d,1=x\\",
        "type": "thermo v2",
        "class": "c=1",
        "region": "r,1",
    }
    assert series[0]["values"] == [1.5]
    seqs = httpx.get(
        f"{vm.url}/api/v1/export",
        params={"match[]": '{__name__="meter_iotnode_seq", device_id="d2"}'},
        timeout=10,
    )
    metric = json.loads(seqs.text.splitlines()[0])["metric"]
    assert metric["region"] == "eu west " and metric["device_id"] == "d2"
