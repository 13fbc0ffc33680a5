"""Stop strings on streamed text: the output ends before the earliest stop string; possible prefixes wait."""

from __future__ import annotations

import pytest

from qwen2vl.generate.stopping import StopMatcher


def run(pieces: list[str], stops) -> tuple[list[str], StopMatcher]:
    m = StopMatcher(stops)
    shown = [m.feed(p) for p in pieces]
    return shown + [m.flush()], m


@pytest.mark.parametrize(
    "pieces, stops, shown, matched",
    [
        (["Hello wor", "ld. STO", "P here"], ["STOP"], "Hello world. ", "STOP"),  # split across pieces
        (["S", "T", "O", "P", "!"], ["STOP"], "", "STOP"),  # one character at a time, at the very start
        (["STOP and more"], ["STOP"], "", "STOP"),  # at the start, in one piece
        (["abc"], ["x"], "abc", None),  # no stop
        (["abc"], [], "abc", None),
        (["one\n\n", "two"], ["\n\n", "two"], "one", "\n\n"),
        (["one two", "\n\n"], ["\n\n", "two"], "one ", "two"),  # the earliest occurrence wins, not the list order
        (["xabcd"], ["abcd", "ab"], "x", "abcd"),  # same start: the longer one is reported
        (["日本", "語の停", "止です"], ["停止"], "日本語の", "停止"),  # unicode
        (["😀a", "😀", "b🙂"], ["😀b"], "😀a", "😀b"),
        (["almost ST", "ill going"], ["STOP"], "almost STill going", None),  # a prefix that did not complete
        (["ends with ST"], ["STOP"], "ends with ST", None),  # held back, then shown by flush
        (["aaab"], ["aab"], "a", "aab"),  # overlapping self-prefix
    ],
)
def test_stop_strings(pieces, stops, shown, matched):
    out, m = run(pieces, stops)
    assert "".join(out) == shown and m.matched == matched and m.stopped == (matched is not None)


def test_text_is_held_only_while_it_could_start_a_stop_string():
    m = StopMatcher(["</answer>", "END"])
    assert m.feed("value </ans") == "value "  # "</ans" may become "</answer>"
    assert m.feed("wer-ish") == "</answer-ish"  # it did not
    assert m.feed(" E") == " "
    assert m.feed("N") == ""
    assert m.feed("D tail") == "" and m.stopped and m.matched == "END"
    assert m.feed("more") == "" and m.flush() == ""  # nothing after a stop


def test_bad_stop_strings_are_rejected_and_empty_ones_ignored():
    with pytest.raises(TypeError, match="stop strings must be strings"):
        StopMatcher(["ok", None])
    assert StopMatcher("END").stops == ("END",)
    m = StopMatcher(["", "x"])
    assert m.feed("abc") == "abc" and not m.stopped
