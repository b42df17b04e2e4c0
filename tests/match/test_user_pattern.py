import torch
import torch.nn as nn
import torch.nn.functional as F

import graftfx
from graftfx import Rule
from graftfx.rewrites.patterns import user


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 8))
        self.w2 = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        h = F.linear(torch.relu(F.linear(x, self.w1)), self.w2)
        return h + torch.tanh(x)


def test_user_pattern_exact_subgraph_match_and_splice():
    @user.pattern("relu_pair", kind="mlp")
    def relu_pair(x, w1, w2):
        return F.linear(torch.relu(F.linear(x, w1)), w2)

    try:
        model = Net().eval()
        traced = graftfx.trace(model, (torch.randn(2, 4, 8),))
        report = graftfx.match(traced, "relu_pair")
        assert len(report.regions) == 1
        r = report.regions[0]
        assert r.kind == "mlp" and r.width == 8 and r.output.target is F.linear
        grafted = graftfx.splice(graftfx.select(traced, [Rule("relu_pair", "mlp", options={"ratio": 2.0})]))
        assert len(list(grafted.spliced_parameters())) == 4
        assert grafted(torch.randn(3, 4, 8)).shape == (3, 4, 8)
    finally:
        user.unregister("relu_pair")
