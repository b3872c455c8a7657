"""TLS: `exitwise serve --ssl-certfile --ssl-keyfile` serves HTTPS (and gRPC over TLS), with `--ssl-ca-certs` only to
clients that show a certificate those signed (mutual TLS); a tier sends its survivors to an `https://` next tier,
checks its certificate (`--next-ca`, else the system's) and shows its own (`--next-cert`, `--next-key`); bad TLS
flags exit 2 in one line. Certificates made here for 127.0.0.1, signed by their own keys."""
import socket
import ssl
import urllib.error

import numpy as np
import pytest

pytest.importorskip("cryptography")

from exitwise.cli import main
from exitwise.deploy.onnx_runtime import OnnxEarlyExit

from conftest import self_signed
from test_tiers import Tier, _borderline, _infer, _stop_every_tier, digits  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(cert.pem, key.pem) for 127.0.0.1, and a second pair (another key: a certificate the first does not vouch
    for; the clients' in the mutual-TLS tests)."""
    folder = tmp_path_factory.mktemp("tls")
    return self_signed(folder / "a"), self_signed(folder / "b")


def _showing(ca, cert, key) -> ssl.SSLContext:
    """A client's TLS context that trusts `ca` and shows `cert` (mutual TLS)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(cert, key)
    return context


def test_a_chain_over_mutual_tls_answers_as_single_process_early_exit_and_each_side_checks_the_other(digits, tls):
    export_dir, images = digits
    (cert, key), (client_cert, client_key) = tls
    expected = OnnxEarlyExit.load(export_dir).run(images)
    https = ("--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    # the cloud serves only clients whose certificate client_cert signed (here: client_cert itself)
    trusted, shown = ssl.create_default_context(cafile=str(cert)), _showing(cert, client_cert, client_key)
    cloud = Tier(export_dir, "--stages", "1-2", "--tier", "cloud", *https, "--ssl-ca-certs", str(client_cert),
                 context=shown)
    shows = ("--next-cert", str(client_cert), "--next-key", str(client_key))
    device = Tier(export_dir, "--stages", "0-0", "--next", cloud.url, "--next-ca", str(cert), *shows,
                  "--tier", "device", *https, context=trusted)
    gateway = Tier(None, "--relay", "--next", device.url, "--next-ca", str(cert), "--tier", "gateway", *https,
                   context=trusted)
    # tiers the cloud and they do not agree with: the system's CAs or a CA that did not sign the cloud's
    # certificate (the tier refuses the cloud), no certificate shown (the cloud refuses the tier)
    refused = {"CERTIFICATE_VERIFY_FAILED": Tier(export_dir, "--stages", "0-0", "--next", cloud.url, *shows),
               "CERTIFICATE_VERIFY_FAILED ": Tier(export_dir, "--stages", "0-0", "--next", cloud.url,
                                                  "--next-ca", str(client_cert), *shows),
               "client certificate": Tier(export_dir, "--stages", "0-0", "--next", cloud.url,
                                            "--next-ca", str(cert))}
    try:
        assert cloud.url.startswith("https://") and device.url.startswith("https://")
        got = _infer(device.url, images[:60], trusted)
        differ = (got["exit"] != expected.exits[:60]) | (got["class"] != expected.predictions[:60])
        assert not (differ & ~_borderline(export_dir, images[:60])).any()
        assert {0, 1} <= set(got["exit"]) and not any(got["degraded"])
        through = _infer(gateway.url, images[:60], trusted)  # a relay over TLS both ways passes it all on
        assert (through["exit"] == got["exit"]).all() and through["tier"] == got["tier"]
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # the client checks too
            _infer(device.url, images[:1], ssl.create_default_context(cafile=str(client_cert)))
        with pytest.raises((ConnectionError, urllib.error.URLError)):  # plain HTTP to an HTTPS port: no answer
            _infer(device.url.replace("https://", "http://"), images[:1], None)
        with pytest.raises((ConnectionError, urllib.error.URLError, ssl.SSLError)):  # no client certificate
            _infer(cloud.url, images[:1], trusted)  # (a features request would be refused the same way)
        stayed = expected.exits[:60] > 0
        for tier in refused.values():  # every survivor answered at the tier's own exit, degraded
            answered = _infer(tier.url, images[:60], None)
            assert answered["degraded"] == stayed.tolist() and set(answered["exit"][stayed]) == {0}
    finally:
        for tier in (gateway, device, *refused.values(), cloud):
            tier.stop()
    for why, tier in refused.items():  # and its log says why
        assert why.strip() in tier.log, (why, tier.log[-500:])


def test_grpc_is_served_over_mutual_tls_with_the_same_certificates(digits, tls):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    export_dir, images = digits
    (cert, key), _ = tls
    expected = OnnxEarlyExit.load(export_dir).run(images[:20])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (client_cert, client_key) = tls[1]
    server = Tier(export_dir, "--grpc-port", str(port), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                  "--ssl-ca-certs", str(client_cert), context=_showing(cert, client_cert, client_key))
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}", ssl=True, root_certificates=str(cert),
                                              private_key=str(client_key), certificate_chain=str(client_cert))
    try:
        tensor = grpcclient.InferInput("image", [20, *images.shape[1:]], "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(images[:20]))
        tensor._get_tensor().parameters["layout"].string_param = "NHWC"
        result = client.infer("digits-convnet", [tensor], client_timeout=60)
        assert (result.as_numpy("exit") == expected.exits).all()
        for refused in (grpcclient.InferenceServerClient(f"127.0.0.1:{port}"),  # no TLS, or no client certificate
                        grpcclient.InferenceServerClient(f"127.0.0.1:{port}", ssl=True, root_certificates=str(cert))):
            with pytest.raises(grpcclient.InferenceServerException):
                refused.is_server_ready(client_timeout=5)
            refused.close()
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
             (["--relay", "--next", "http://127.0.0.1:1", "--next-ca", str(cert)], "plain http"),
             (["--ssl-ca-certs", str(cert)], "give --ssl-certfile"),
             (["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certs", str(garbage)],
              "--ssl-ca-certs"),
             (["--stages", "0-0", "--next", "https://127.0.0.1:1", "--next-cert", str(cert)], "go together"),
             (["--stages", "0-0", "--next", "https://127.0.0.1:1", "--next-cert", str(cert), "--next-key",
               str(other_key)], "cannot load a certificate"),
             (["--stages", "0-0", "--next", "http://127.0.0.1:1", "--next-cert", str(cert), "--next-key", str(key)],
              "plain http")]
    for args, message in cases:
        model = [] if "--relay" in args else ["--export", export_dir]
        assert main(["serve", *model, "--port", "0", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
