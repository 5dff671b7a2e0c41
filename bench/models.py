"""Torch model factories for tests, benchmarks and ``sparsedge convert --arch``.

torch is imported lazily inside the functions, so importing this module never needs torch.
Every factory returns an ``nn.Module`` in eval mode, usable as
``--arch sparsedge.bench.models:resnet_small`` (keyword arguments take their defaults).

Factories and their forward signatures:

* ``resnet_small(num_classes=10, width=16, blocks=(1, 1), in_ch=3)``: ``forward(x)``, x float32
  ``[batch, in_ch, H, W]`` -> logits ``[batch, num_classes]``. Conv-BN-ReLU stem, basic residual
  blocks (``relu(bn(conv(relu(bn(conv(x))))) + shortcut)``), stride-2 stages with 1x1 projection
  shortcuts, max pooling in the stem, global average pooling, linear head.
* ``mobilenetv2_small(num_classes=10, width=16, in_ch=3)``: ``forward(x)`` as above; inverted
  residual blocks (1x1 expand, 3x3 depthwise, 1x1 project; relu6), residual when shapes match.
* ``bert_small(vocab=100, hidden=32, layers=2, heads=4, ffn=64, max_pos=64, type_vocab=2,
  pooling="mean", normalize=False)``: ``forward(input_ids, attention_mask)``, both int64
  ``[batch, seq]`` -> ``[batch, hidden]`` masked mean pooling of the last hidden state
  (``pooling=None`` returns ``[batch, seq, hidden]``). Post-LN BERT layers, gelu FFN, additive mask.
* ``mlp(in_features=64, hidden=(128, 128), out_features=10, activation="relu")``: an ``nn.Sequential``,
  ``forward(input)``, input float32 ``[batch, in_features]``.
"""
from __future__ import annotations

import math

__all__ = ["resnet_small", "mobilenetv2_small", "bert_small", "hf_bert", "mlp", "build", "SHAPES"]

# default ``--shape`` specs per factory (used by ``sparsedge convert --arch`` when none are given)
SHAPES = {
    "resnet_small": ["x:batch,3,32,32"],
    "mobilenetv2_small": ["x:batch,3,32,32"],
    "bert_small": ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"],
    "hf_bert": ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64", "token_type_ids:batch,seq:int64"],
    "mlp": ["input:batch,64"],
}


def _nn():
    import torch
    from torch import nn

    return torch, nn


def resnet_small(num_classes: int = 10, width: int = 16, blocks=(1, 1), in_ch: int = 3):
    """A ResNet-style CNN: ``[B, in_ch, H, W]`` float32 -> ``[B, num_classes]``."""
    torch, nn = _nn()

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.down is None else self.down(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNetSmall(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(), nn.MaxPool2d(3, 2, 1))
            layers, cin = [], width
            for i, n in enumerate(blocks):
                cout = width * (2 ** i)
                for j in range(n):
                    layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                    cin = cout
            self.layers = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, num_classes)

        def forward(self, x):
            x = self.layers(self.stem(x))
            return self.fc(torch.flatten(self.pool(x), 1))

    return _init(ResNetSmall())


def mobilenetv2_small(num_classes: int = 10, width: int = 16, in_ch: int = 3):
    """A MobileNetV2-style CNN (depthwise, inverted residuals, relu6)."""
    torch, nn = _nn()

    def cbr(cin, cout, k, s, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU6())
        return layers

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hid = cin * expand
            self.use_res = stride == 1 and cin == cout
            layers = []
            if expand != 1:
                layers += cbr(cin, hid, 1, 1)
            layers += cbr(hid, hid, 3, stride, groups=hid)
            layers += cbr(hid, cout, 1, 1, act=False)
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2Small(nn.Module):
        def __init__(self):
            super().__init__()
            w = width
            cfg = [(1, w, 1), (4, w + 8, 2), (4, w + 8, 1), (4, 2 * w, 2)]  # (expand, cout, stride)
            layers = cbr(in_ch, w, 3, 2)
            cin = w
            for t, c, s in cfg:
                layers.append(InvertedResidual(cin, c, s, t))
                cin = c
            layers += cbr(cin, 4 * w, 1, 1)
            self.features = nn.Sequential(*layers)
            self.dropout = nn.Dropout(0.2)
            self.classifier = nn.Linear(4 * w, num_classes)

        def forward(self, x):
            x = self.features(x)
            x = x.mean([2, 3])
            return self.classifier(self.dropout(x))

    return _init(MobileNetV2Small())


def bert_small(vocab: int = 100, hidden: int = 32, layers: int = 2, heads: int = 4, ffn: int = 64,
               max_pos: int = 64, type_vocab: int = 2, pooling: str | None = "mean", normalize: bool = False,
               eps: float = 1e-12):
    """A BERT-style encoder: ``(input_ids, attention_mask)`` int64 ``[B, S]`` -> ``[B, hidden]``."""
    torch, nn = _nn()
    F = torch.nn.functional
    dh = hidden // heads

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(hidden, hidden)
            self.k = nn.Linear(hidden, hidden)
            self.v = nn.Linear(hidden, hidden)
            self.o = nn.Linear(hidden, hidden)
            self.ln1 = nn.LayerNorm(hidden, eps=eps)
            self.ff1 = nn.Linear(hidden, ffn)
            self.ff2 = nn.Linear(ffn, hidden)
            self.ln2 = nn.LayerNorm(hidden, eps=eps)
            self.drop = nn.Dropout(0.1)

        def forward(self, x, add_mask):
            b, s, _ = x.shape
            q = self.q(x).view(b, s, heads, dh).transpose(1, 2)
            k = self.k(x).view(b, s, heads, dh).transpose(1, 2)
            v = self.v(x).view(b, s, heads, dh).transpose(1, 2)
            att = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dh) + add_mask
            att = self.drop(torch.softmax(att, dim=-1))
            ctx = torch.matmul(att, v).transpose(1, 2).reshape(b, s, hidden)
            x = self.ln1(x + self.drop(self.o(ctx)))
            return self.ln2(x + self.drop(self.ff2(F.gelu(self.ff1(x)))))

    class BertSmall(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding(vocab, hidden)
            self.pos = nn.Embedding(max_pos, hidden)
            self.tok_type = nn.Embedding(type_vocab, hidden)
            self.ln = nn.LayerNorm(hidden, eps=eps)
            self.layers = nn.ModuleList([Layer() for _ in range(layers)])

        def forward(self, input_ids, attention_mask):
            s = input_ids.shape[1]
            pos = torch.arange(s, device=input_ids.device).unsqueeze(0)
            x = self.word(input_ids) + self.pos(pos) + self.tok_type(torch.zeros_like(input_ids))
            x = self.ln(x)
            add_mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
            for layer in self.layers:
                x = layer(x, add_mask)
            if pooling is None:
                return x
            m = attention_mask.unsqueeze(-1).to(x.dtype)
            out = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
            if normalize:
                out = F.normalize(out, p=2, dim=1)
            return out

    return _init(BertSmall())


def hf_bert(vocab_size: int = 100, hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 4,
            intermediate_size: int = 64, max_position_embeddings: int = 64, type_vocab_size: int = 2,
            layer_norm_eps: float = 1e-12, hidden_act: str = "gelu", pooler: bool = True, sentence: bool = False,
            normalize: bool = True):
    """A Hugging Face ``BertModel`` rebuilt by hand (same state_dict keys and eager math; transformers
    is not needed): ``forward(input_ids, attention_mask, token_type_ids)`` -> dict with
    ``last_hidden_state`` and ``pooler_output`` (or ``sentence_embedding`` when ``sentence``: masked
    mean pooling, L2-normalised when ``normalize``). ``config(...)`` gives the matching config.json."""
    torch, nn = _nn()
    F = torch.nn.functional
    H, nh = hidden_size, num_attention_heads
    dh = H // nh
    act = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}[hidden_act]

    class Embeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(vocab_size, H)
            self.position_embeddings = nn.Embedding(max_position_embeddings, H)
            self.token_type_embeddings = nn.Embedding(type_vocab_size, H)
            self.LayerNorm = nn.LayerNorm(H, eps=layer_norm_eps)
            self.dropout = nn.Dropout(0.1)
            self.register_buffer("position_ids", torch.arange(max_position_embeddings).expand((1, -1)),
                                 persistent=False)

        def forward(self, input_ids, token_type_ids):
            s = input_ids.shape[1]
            pos = self.position_ids[:, :s]
            x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
            x = x + self.position_embeddings(pos)
            return self.dropout(self.LayerNorm(x))

    class SelfAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)
            self.dropout = nn.Dropout(0.1)

        def forward(self, x, mask):
            b, s, _ = x.shape
            q = self.query(x).view(b, s, nh, dh).transpose(1, 2)
            k = self.key(x).view(b, s, nh, dh).transpose(1, 2)
            v = self.value(x).view(b, s, nh, dh).transpose(1, 2)
            sc = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dh) + mask
            p = self.dropout(torch.softmax(sc, dim=-1))
            return torch.matmul(p, v).permute(0, 2, 1, 3).contiguous().view(b, s, H)

    class DenseLN(nn.Module):
        def __init__(self, din):
            super().__init__()
            self.dense = nn.Linear(din, H)
            self.LayerNorm = nn.LayerNorm(H, eps=layer_norm_eps)
            self.dropout = nn.Dropout(0.1)

        def forward(self, h, x):
            return self.LayerNorm(self.dropout(self.dense(h)) + x)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.self = SelfAttn()
            self.output = DenseLN(H)

        def forward(self, x, mask):
            return self.output(self.self(x, mask), x)

    class Intermediate(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(H, intermediate_size)

        def forward(self, x):
            return act(self.dense(x))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attention()
            self.intermediate = Intermediate()
            self.output = DenseLN(intermediate_size)

        def forward(self, x, mask):
            x = self.attention(x, mask)
            return self.output(self.intermediate(x), x)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList([Layer() for _ in range(num_hidden_layers)])

    class Pooler(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(H, H)

        def forward(self, x):
            return torch.tanh(self.dense(x[:, 0]))

    class BertModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = Encoder()
            self.pooler = Pooler() if pooler and not sentence else None

        def forward(self, input_ids, attention_mask, token_type_ids):
            x = self.embeddings(input_ids, token_type_ids)
            mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
            for layer in self.encoder.layer:
                x = layer(x, mask)
            out = {"last_hidden_state": x}
            if sentence:
                m = attention_mask.unsqueeze(-1).to(x.dtype)
                e = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out["sentence_embedding"] = F.normalize(e, p=2, dim=1) if normalize else e
            elif self.pooler is not None:
                out["pooler_output"] = self.pooler(x)
            return out

    model = _init(BertModel())
    model.config = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": vocab_size,
                    "hidden_size": H, "num_hidden_layers": num_hidden_layers, "num_attention_heads": nh,
                    "intermediate_size": intermediate_size, "max_position_embeddings": max_position_embeddings,
                    "type_vocab_size": type_vocab_size, "layer_norm_eps": layer_norm_eps, "hidden_act": hidden_act}
    return model


def mlp(in_features: int = 64, hidden=(128, 128), out_features: int = 10, activation: str = "relu"):
    """A plain MLP: ``[B, in_features]`` float32 -> ``[B, out_features]``."""
    torch, nn = _nn()
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}
    layers, cin = [], in_features
    for h in hidden:
        layers += [nn.Linear(cin, h), acts[activation]()]
        cin = h
    layers.append(nn.Linear(cin, out_features))
    return _init(nn.Sequential(*layers))


def _init(model):
    """Deterministic, non-trivial parameters and batchnorm statistics; eval mode."""
    torch, nn = _nn()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1.0 + 0.2 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def build(spec: str, **kwargs):
    """``build("resnet_small")`` -> the module; a helper for benchmarks."""
    return globals()[spec](**kwargs)
