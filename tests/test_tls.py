"""TLS: `exitwise serve --ssl-certfile --ssl-keyfile` serves HTTPS (and gRPC over TLS); a tier sends its survivors
to an `https://` next tier and checks its certificate (`--next-ca`, else the system's); bad TLS flags exit 2 in
one line. Certificates made here for 127.0.0.1, signed by their own keys."""
import json
import socket
import ssl
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("cryptography")

from exitwise.cli import main
from exitwise.deploy.onnx_runtime import OnnxEarlyExit

from conftest import self_signed
from test_tiers import Tier, _borderline, digits  # noqa: F401 (digits: the fixture)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(cert.pem, key.pem) for 127.0.0.1, and a second pair (another key: a certificate the first does not vouch for)."""
    folder = tmp_path_factory.mktemp("tls")
    return self_signed(folder / "a"), self_signed(folder / "b")


def _infer(url: str, images: np.ndarray, context: ssl.SSLContext | None) -> dict:
    body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape),
                                   "parameters": {"layout": "NHWC"}, "data": images.reshape(-1).tolist()}]})
    request = urllib.request.Request(f"{url}/v2/models/digits-convnet/infer", body.encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60, context=context) as response:
        doc = json.loads(response.read())
    out = {o["name"]: o["data"] for o in doc["outputs"]}
    return {"exit": np.array(out["exit"]), "class": np.array(out["class_index"]), **doc.get("parameters", {})}


def test_a_chain_over_https_answers_as_single_process_early_exit_and_checks_the_next_tiers_certificate(digits, tls):
    export_dir, images = digits
    (cert, key), (other_cert, _) = tls
    expected = OnnxEarlyExit.load(export_dir).run(images)
    https = ("--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    cloud = Tier(export_dir, "--stages", "1-2", "--tier", "cloud", *https, ca=cert)
    device = Tier(export_dir, "--stages", "0-0", "--next", cloud.url, "--next-ca", str(cert), "--tier", "device",
                  *https, ca=cert)
    # a tier that does not trust the cloud's certificate: the system's CAs, or a CA that did not sign it
    untrusting = [Tier(export_dir, "--stages", "0-0", "--next", cloud.url, "--tier", "device"),
                  Tier(export_dir, "--stages", "0-0", "--next", cloud.url, "--next-ca", str(other_cert))]
    gateway = Tier(None, "--relay", "--next", device.url, "--next-ca", str(cert), "--tier", "gateway", *https, ca=cert)
    trusted = ssl.create_default_context(cafile=str(cert))
    try:
        assert cloud.url.startswith("https://") and device.url.startswith("https://")
        got = _infer(device.url, images[:60], trusted)
        through = _infer(gateway.url, images[:60], trusted)  # a relay over TLS both ways passes it all on
        assert (through["exit"] == got["exit"]).all() and through["tier"] == got["tier"]
        differ = (got["exit"] != expected.exits[:60]) | (got["class"] != expected.predictions[:60])
        assert not (differ & ~_borderline(export_dir, images[:60])).any()
        assert {0, 1} <= set(got["exit"]) and not any(got["degraded"])
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # the client checks too
            _infer(device.url, images[:1], ssl.create_default_context(cafile=str(other_cert)))
        with pytest.raises((ConnectionError, urllib.error.URLError)):  # plain HTTP to an HTTPS port: no answer
            _infer(device.url.replace("https://", "http://"), images[:1], None)
        stayed = expected.exits[:60] > 0
        for tier in untrusting:  # every survivor answered at the tier's own exit, degraded, and the log says why
            refused = _infer(tier.url, images[:60], None)
            assert refused["degraded"] == stayed.tolist() and set(refused["exit"][stayed]) == {0}
    finally:
        for tier in (gateway, device, *untrusting, cloud):
            tier.stop()
    for tier in untrusting:
        assert "CERTIFICATE_VERIFY_FAILED" in tier.log


def test_grpc_is_served_over_tls_with_the_same_certificate(digits, tls):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    export_dir, images = digits
    (cert, key), _ = tls
    expected = OnnxEarlyExit.load(export_dir).run(images[:20])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Tier(export_dir, "--grpc-port", str(port), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                  ca=cert)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}", ssl=True, root_certificates=str(cert))
    try:
        tensor = grpcclient.InferInput("image", [20, *images.shape[1:]], "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(images[:20]))
        tensor._get_tensor().parameters["layout"].string_param = "NHWC"
        result = client.infer("digits-convnet", [tensor], client_timeout=60)
        assert (result.as_numpy("exit") == expected.exits).all()
        plain = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")  # no TLS: refused by the server
        with pytest.raises(Exception):
            plain.is_server_ready(client_timeout=5)
        plain.close()
    finally:
        client.close()
        server.stop()


def test_bad_tls_flags_exit_2_in_one_line(digits, tls, tmp_path, capsys):
    export_dir = str(digits[0])
    (cert, key), (_, other_key) = tls
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [(["--ssl-certfile", str(cert)], "go together"),
             (["--ssl-keyfile", str(key)], "go together"),
             (["--ssl-certfile", str(cert), "--ssl-keyfile", str(other_key)], "cannot load a certificate"),
             (["--ssl-certfile", str(garbage), "--ssl-keyfile", str(key)], "cannot load a certificate"),
             (["--ssl-certfile", str(tmp_path / "absent.pem"), "--ssl-keyfile", str(key)], "cannot load"),
             (["--stages", "0-0", "--next", "http://127.0.0.1:1", "--next-ca", str(cert)], "plain http"),
             (["--stages", "0-0", "--next", "https://127.0.0.1:1", "--next-ca", str(garbage)], "--next-ca"),
             (["--next-ca", str(cert)], "goes with --next"),
             (["--relay", "--next", "http://127.0.0.1:1", "--next-ca", str(cert)], "plain http")]
    for args, message in cases:
        model = [] if "--relay" in args else ["--export", export_dir]
        assert main(["serve", *model, "--port", "0", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
