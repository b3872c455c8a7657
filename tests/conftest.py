"""Shared fixtures: tiny generated image sets and the location of ../shared."""
import time
from pathlib import Path

import pytest
import torch

from exitwise.data import ImageSet

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_JPG = SHARED / "data" / "cifar10-jpg.tar.gz"
SEED_WEIGHTS = SHARED / "seed" / "cifar10_branchyNet_m.h5"


def until(condition, seconds: float = 10, every: float = 0.01) -> None:
    """Wait for `condition()` (another thread's or process's doing), at most `seconds`; fail if it never holds."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(every)
    assert condition()


def read_http_answer(sock) -> bytes:
    """One HTTP answer read whole from a raw socket: its head, then Content-Length bytes of body (a server may write
    them apart); bounded by the socket's timeout, and ended early if the server closes."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                   if line.lower().startswith(b"content-length:")), None)
    while (length is None or len(body) < length) and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def random_image_set(n: int, shape=(8, 8, 1), num_classes: int = 10, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return ImageSet(images, labels, tuple(str(i) for i in range(num_classes)))


def spread_thresholds(net, data, policy, shares=(0.3, 0.3)) -> list[float]:
    """Thresholds that let about `shares` of the samples out at the side exits (so every exit is used)."""
    import numpy as np
    from exitwise.runtime import all_exit_logits, prepare
    scores = policy.scores(torch.from_numpy(all_exit_logits(prepare(net), data).logits)).numpy()
    return [float(np.quantile(scores[k], s)) for k, s in enumerate(shares)]


@pytest.fixture
def needs_cifar():
    if not (CIFAR_JPG.is_file() and SEED_WEIGHTS.is_file()):
        pytest.skip("../shared CIFAR-10 copy or seed weights not present")


@pytest.fixture(autouse=True, scope="session")
def _private_data_cache(tmp_path_factory):
    """Decoded data sets go to a cache private to this test session, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EXITWISE_CACHE_DIR", str(tmp_path_factory.mktemp("exitwise-cache")))
    yield
    mp.undo()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and localhost), signed by its own key: (cert.pem, key.pem) in `folder`. Clients
    trust it by taking cert.pem as their CA file."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"
