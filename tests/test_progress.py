"""Progress output: a bar in a terminal, a line every few percent in a log file."""
import io

from tqdm import tqdm

from dptrain.progress import LOG_STEP, LogLines, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_file_gets_whole_lines_at_milestones():
    log = io.StringIO()
    with progress_bar(total=1000, desc="private training", unit="step", file=log) as bar:
        for step in range(1000):
            bar.update(1)
            bar.set_postfix(eps=step)
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert len(lines) == round(1 / LOG_STEP)
    assert lines[-1].startswith("private training: 100% 1000/1000")
    assert [int(line.split("%")[0].split()[-1]) for line in lines] == list(range(5, 101, 5))


def test_unfinished_work_prints_where_it_stopped():
    log = io.StringIO()
    bar = progress_bar(total=10, desc="d", file=log)
    bar.update(3)
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("d:  30% 3/10")


def test_terminal_keeps_the_redrawn_bar():
    screen = Terminal()
    bar = progress_bar(total=3, file=screen)
    assert type(bar) is tqdm and not isinstance(bar, LogLines)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in screen.getvalue()


def test_disabled_prints_nothing():
    log = io.StringIO()
    for _ in progress_bar(range(5), file=log, disable=True):
        pass
    assert log.getvalue() == ""
