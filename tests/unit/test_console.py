"""soda.hypervisors.console: a console's meaningful tail, escapes removed."""

from soda.hypervisors import console

NOISY = (
    "setup_one_line failed for device 3 : configured as 'none'\n"
    "epollctl add err fd 17, Operation not permitted\n"
    "[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39msysinit.target\x1b[0m\n"
    "[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mgetty@tty1.service\x1b[0m - Getty on tty1.\n"
    "systemd[1]: modprobe@loop.service: Deactivated successfully.\n"
    "systemd-journald[46]: Received client request to flush runtime journal.\n"
    "[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mnginx.service\x1b[0m\n"
    "         Starting \x1b[0;1;39mnginx.service\x1b[0m - A high performance web server...\n"
    "systemd[1]: Reached target sysinit.target - System Initialization.\n"
    "\n"
    "[\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39mnginx.service\x1b[0m.\n"
    "nginx: [emerg] socket() [::]:80 failed (97: Address family not supported by protocol)\n"
    "evil \x1b]0;title\x07 \x08\x08 text\n"
)


def test_noise_and_escapes_are_left_out(tmp_path):
    path = tmp_path / "console.log"
    path.write_text(NOISY)
    assert console.last_lines(str(path)) == [
        "[  OK  ] Started nginx.service",
        "[FAILED] Failed to start nginx.service.",
        "nginx: [emerg] socket() [::]:80 failed (97: Address family not supported by protocol)",
        "evil   text",
    ]
    assert console.quote(str(path), 1) == "evil   text"


def test_a_long_console_is_read_from_its_end_in_whole_lines(tmp_path):
    path = tmp_path / "console.log"
    path.write_text("".join(f"line {i} " + "x" * 50 + "\n" for i in range(5000)) + "the end\n")
    tail = console.read_tail(str(path), 4096)
    assert len(tail) <= 4096 and tail.startswith("line ") and tail.endswith("the end\n")
    assert console.last_lines(str(path), 2)[-1] == "the end"
    assert console.quote(str(tmp_path / "missing")) == ""


def test_lines_are_cut(tmp_path):
    path = tmp_path / "console.log"
    path.write_text("a" * 10000 + "\n")
    assert console.last_lines(str(path)) == ["a" * console.LINE_MAX]
