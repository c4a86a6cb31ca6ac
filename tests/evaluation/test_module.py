"""ResponseLog: whole lines, and a line a kill cut short never swallows the next record."""
import json

from llava_circuits.evaluation.module import ResponseLog


def test_a_record_appended_after_a_cut_line_is_kept(tmp_path):
    log = ResponseLog(tmp_path)
    log.append("responses", {"id": "1", "response": "yes"})
    with open(log.path("responses"), "a") as f:
        f.write('{"id": "2", "resp')  # the kill
    resumed = ResponseLog(tmp_path)
    resumed.append("responses", {"id": "3", "response": "no"})
    assert sorted(resumed.read("responses")) == ["1", "3"]  # 2 is redone; 3 is not lost in 2's line
    assert resumed.done_ids() == {"1", "3"}
    lines = log.path("responses").read_text().splitlines()
    assert json.loads(lines[-1]) == {"id": "3", "response": "no"}


def test_opening_a_whole_log_changes_nothing(tmp_path):
    log = ResponseLog(tmp_path)
    log.append("errors", {"id": "1", "error": "x"})
    before = log.path("errors").read_bytes()
    ResponseLog(tmp_path)
    assert log.path("errors").read_bytes() == before and not log.path("responses").exists()


def test_a_line_that_is_json_but_not_a_record_names_file_and_line(tmp_path):
    import pytest

    log = ResponseLog(tmp_path)
    log.append("responses", {"id": "1", "response": "yes"})
    with open(log.path("responses"), "a") as f:
        f.write('{"response": "no"}\n')
    with pytest.raises(ValueError, match=r"responses\.jsonl:2: not a record with an 'id'"):
        log.read("responses")
