"""The one way a text file a user hands us is read: UTF-8 with or without a byte-order mark, any line ending,
and a one-line UserError naming the file (and the byte or line) when it is not text at all."""
import os

from utils.errors import UserError

MAX_BYTES = 512 * 1024 * 1024          # a list of a million paths is ~100 MB; anything far bigger is not a list


def read_text(path: str, what: str, fix: str, max_bytes: int = MAX_BYTES) -> str:
    """The file's text (BOM removed, lines still with their endings as read: use .splitlines()). `what` names the
    file in the message (e.g. "--config a.yaml"), `fix` says what to pass instead."""
    if os.path.isdir(path):
        raise UserError(f"{what} is a folder, not a file; {fix}")
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise UserError(f"{what} has {size} bytes, more than a text file of this kind holds "
                            f"({max_bytes} at most): is it the right file? {fix}")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{what} cannot be read ({e.strerror or e}); {fix}") from None
    return decode_text(data, what, fix)


def decode_text(data: bytes, what: str, fix: str) -> str:
    """bytes as UTF-8 text (a BOM dropped); a NUL byte or bytes that are not UTF-8 are one line naming the line."""
    if data.startswith(b"\xff\xfe") or data.startswith(b"\xfe\xff"):
        raise UserError(f"{what} is UTF-16 text; save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8), then {fix}")
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise UserError(f"{what} is not a text file (a NUL byte on line {line}: a binary file, such as a checkpoint "
                        f"or an archive, given by mistake?); {fix}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}: Latin-1 or "
                        f"another encoding?); save it as UTF-8, then {fix}") from None
    return text.removeprefix("\ufeff")


def text_lines(path: str, what: str, fix: str) -> list:
    """[(line number, text stripped of surrounding space)] of the lines that are neither blank nor # comments."""
    lines = read_text(path, what, fix).splitlines()
    return [(n, s) for n, s in ((n, line.strip()) for n, line in enumerate(lines, start=1)) if s and s[0] != "#"]
