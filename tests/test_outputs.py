"""RequestOutput / CompletionOutput serialize to one JSON line each."""

import json

from klotski.outputs import CompletionOutput, RequestOutput


def test_request_output_round_trips_through_json():
    completion = CompletionOutput(
        index=0,
        text="hi",
        token_ids=[5, 1],
        cumulative_logprob=-1.5,
        logprobs=[{5: -0.5, 7: -1.0}, {1: -1.0}],
        finish_reason="stop",
    )
    output = RequestOutput(
        request_id="0", prompt="Say hi", prompt_token_ids=[3, 4], outputs=[completion], finished=True
    )
    line = json.dumps(output.to_dict())
    back = json.loads(line)
    assert back["outputs"][0]["logprobs"] == [{"5": -0.5, "7": -1.0}, {"1": -1.0}]
    assert back["outputs"][0]["finish_reason"] == "stop" and back["outputs"][0]["stop_reason"] is None
    assert back["prompt_token_ids"] == [3, 4] and back["finished"] is True
    assert completion.finished() and not CompletionOutput(0, "", []).finished()
