"""Pure parts of the harness: histogram, wire formats, argument checks."""

from __future__ import annotations

import random

import pytest

from bench import proto
from bench.hist import Histogram, bucket_of, bucket_value
from bench.report import table_rows
from bench.runner import Scenario, Target


def test_histogram_percentiles_are_within_two_percent_of_exact() -> None:
    rng = random.Random(7)
    values = [int(rng.lognormvariate(8, 1.5)) for _ in range(20_000)]
    h = Histogram()
    for v in values:
        h.record_us(v)
    values.sort()
    for p in (50.0, 90.0, 99.0, 99.9):
        exact = values[int(p / 100 * len(values)) - 1]
        assert abs(h.percentile_us(p) - exact) <= max(2.0, 0.02 * exact), (p, exact, h.percentile_us(p))
    assert h.percentile_us(100) == values[-1]
    assert h.percentile_us(0) == values[0]


def test_histograms_merged_across_processes_equal_one_histogram() -> None:
    a, b, both = Histogram(), Histogram(), Histogram()
    for v in range(0, 50_000, 7):
        (a if v % 2 else b).record_us(v)
        both.record_us(v)
    merged = Histogram.from_json(a.to_json())
    merged.merge(Histogram.from_json(b.to_json()))
    assert merged.counts == both.counts and merged.count == both.count and merged.max_us == both.max_us


def test_bucket_width_is_at_most_one_64th_of_the_value() -> None:
    for v in (128, 129, 1000, 65_535, 10**6, 10**9):
        assert abs(bucket_value(bucket_of(v)) - v) <= v / 64


def test_percentile_outside_0_to_100_is_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="101"):
        Histogram().percentile_us(101)


def test_mqtt_parser_reassembles_packets_cut_and_joined_across_frames() -> None:
    pkt = proto.mqtt_publish_qos1(b"t/x", 300, b"y" * 200)  # remaining length needs 2 bytes
    puback = b"\x40\x02\x01\x2c"
    stream = pkt + puback + puback
    p = proto.MqttParser()
    got = []
    for i in range(0, len(stream), 3):
        got += p.feed(stream[i : i + 3])
    assert [t for t, _ in got] == [3, proto.MQTT_PUBACK, proto.MQTT_PUBACK]
    assert got[1][1] == b"\x01\x2c"


def test_mqtt_malformed_length_is_an_error_naming_the_bytes() -> None:
    with pytest.raises(proto.BenchError, match="malformed"):
        proto.MqttParser().feed(b"\x30\xff\xff\xff\xff\x01")


def test_mqtt_packet_id_out_of_range_is_refused() -> None:
    with pytest.raises(proto.BenchError, match="70000"):
        proto.mqtt_publish_qos1(b"t", 70000, b"")


def test_replies_decode_acks_errors_and_garbage() -> None:
    assert proto.decode_reply(b'{"ack": 7}', False).ack == 7
    assert proto.decode_reply(proto.msgpack.packb({"ack": 3}), True).ack == 3
    err = proto.decode_reply(b'{"error": "seq missing", "seq": null}', False)
    assert err.ack is None and err.error == "seq missing"
    junk = proto.decode_reply(b"\xc1garbage", True)
    assert junk.ack is None and "garbage" in (junk.error or "")


def test_messages_round_trip_in_both_encodings() -> None:
    data = proto.make_data(100)
    m = proto.msgpack.unpackb(proto.encode_message("msgpack", 5, 1.5, data))
    j = proto.json.loads(proto.encode_message("json", 5, 1.5, data))
    assert m == j == {"seq": 5, "ts": 1.5, "data": data}


def test_secret_is_read_from_the_node_data_dir(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "jwt_secret").write_text("s3cret-from-the-node-0123456789\n")
    assert proto.read_secret(None, tmp_path) == "s3cret-from-the-node-0123456789"
    with pytest.raises(proto.BenchError, match="jwt_secret"):
        proto.read_secret(None, tmp_path / "missing")


@pytest.mark.parametrize(
    "field,value",
    [
        ("connections", 0),
        ("rate", 0.0),
        ("window", 0),
        ("duration", -1.0),
        ("encoding", "xml"),
        ("processes", 99),
    ],
)
def test_bad_scenario_values_are_refused_with_the_value(field: str, value: object) -> None:
    with pytest.raises(proto.BenchError, match=repr(value).strip("'")):
        Scenario(**{field: value}).check()  # type: ignore[arg-type]


def test_a_target_off_loopback_is_refused() -> None:
    with pytest.raises(proto.BenchError, match="10.0.0.5"):
        Target("x", "ws://10.0.0.5:8000/v1/ingest").check()


def test_table_reports_ratios_to_noop_and_iotnode_against_each_peer() -> None:
    def res(name: str, thr: float, p99: float) -> dict[str, object]:
        return {
            "target": {"name": name},
            "acked_msg_s": thr,
            "latency_ms": {"p50": 1, "p99": p99, "p99.9": p99, "max": p99},
            "errors": 0,
            "unacked": 0,
            "connections_open": 1,
            "target_procs": {"cpu_pct_of_one_core": 1},
            "generator": {"cpu_pct_of_one_core": 1},
        }

    rows = table_rows(
        [
            res("noop", 1000, 2),
            res("iotnode", 500, 8),
            res("redis", 250, 16),
            {"target": {"name": "mosquitto"}, "skipped": "not installed"},
        ]
    )
    by = {r["target"]: r for r in rows}
    assert by["iotnode"]["thr_vs_noop"] == 0.5 and by["iotnode"]["p99_vs_noop"] == 4.0
    assert by["redis"]["iotnode_thr_vs_this"] == 2.0 and by["redis"]["iotnode_p99_vs_this"] == 0.5
    assert by["mosquitto"]["skipped"] == "not installed"


def test_listening_addresses_are_decoded_from_proc_net_tcp_and_tcp6() -> None:
    from bench.targets import _hex_addr

    assert _hex_addr("0100007F:1F90") == "127.0.0.1:8080"
    assert _hex_addr("00000000:0050") == "0.0.0.0:80"
    assert _hex_addr("0000000000000000FFFF00000100007F:1F90") == "[::ffff:127.0.0.1]:8080"
    assert _hex_addr("00000000000000000000000001000000:0050") == "[::1]:80"


def test_a_test_servers_own_listening_socket_is_found_on_loopback() -> None:
    import os
    import socket

    from bench.targets import check_loopback_only

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert f"127.0.0.1:{port}" in check_loopback_only("self", [os.getpid()])


def test_node_side_ack_latency_quantiles_come_from_bucket_deltas() -> None:
    from bench.procstat import bucket_quantiles

    before = {"0.001": 10.0, "0.01": 10.0, "0.1": 10.0, "+Inf": 10.0}
    after = {"0.001": 60.0, "0.01": 100.0, "0.1": 109.0, "+Inf": 110.0}  # 100 new: 50 <=1ms, 40 <=10ms, 9, 1
    q = bucket_quantiles(before, after)
    assert q == {"p50": "<= 0.001 s", "p99": "<= 0.1 s", "count": "100"}
    assert bucket_quantiles(after, after) == {}


def test_soak_drift_compares_the_first_and_last_fifth_of_the_run() -> None:
    from bench.runner import drift

    timeline = [{"t": t, "p99_ms": 10.0 if t <= 4 else 50.0, "acked": 1000} for t in range(1, 21)]
    samples = [{"t": t, "procs": {"web[1]": {"rss_mb": 100.0 + 5 * t, "cpu_pct": 1.0}}} for t in range(0, 21)]
    d = drift({"timeline": timeline, "target_procs": {"samples": samples}})
    assert d["p99_ms_first"] == 10.0 and d["p99_ms_last"] == 50.0
    assert d["acked_s_first"] == d["acked_s_last"] == 1000
    assert d["rss_mb_first"] == 105.0 and d["rss_mb_last"] == 200.0


def test_e2e_node_env_options_become_node_settings_and_anything_else_is_refused() -> None:
    from bench.e2e import parse_node_env

    assert parse_node_env(["NODE_PIPELINE_COALESCE_MS=0", "NODE_PUB_HWM=5"]) == {
        "NODE_PIPELINE_COALESCE_MS": "0",
        "NODE_PUB_HWM": "5",
    }
    for bad in ("NODE_PIPELINE_COALESCE_MS", "PATH=/tmp"):
        with pytest.raises(proto.BenchError, match="NODE_VAR=VALUE"):
            parse_node_env([bad])


def test_node_env_options_override_the_harness_defaults(tmp_path: object) -> None:
    """``--node-env NODE_LOG_LEVEL=info`` used to crash the harness (a keyword given twice)."""
    from pathlib import Path

    from bench.targets import node_env

    env, _ = node_env(Path(str(tmp_path)), 2, (), NODE_LOG_LEVEL="info", NODE_PUB_HWM="5")
    assert env["NODE_LOG_LEVEL"] == "info" and env["NODE_PUB_HWM"] == "5"
    env, _ = node_env(Path(str(tmp_path)), 2, ())
    assert env["NODE_LOG_LEVEL"] == "warning" and env["NODE_WEB_WORKERS"] == "2"


def test_c10k_max_soak_and_compare_take_node_env_options() -> None:
    from bench.__main__ import build_parser

    ap = build_parser()
    for argv in (
        ["c10k", "--target", "iotnode", "--node-env", "NODE_PIPELINE_COALESCE_MS=20"],
        ["max", "--target", "iotnode", "--node-env", "NODE_PIPELINE_COALESCE_MS=20"],
        ["soak", "--target", "iotnode", "--node-env", "NODE_PIPELINE_COALESCE_MS=20"],
        ["compare", "--node-env", "NODE_PIPELINE_COALESCE_MS=20"],
    ):
        assert ap.parse_args(argv).node_env == ["NODE_PIPELINE_COALESCE_MS=20"], argv
    assert ap.parse_args(["c10k", "--target", "iotnode"]).node_env == []
