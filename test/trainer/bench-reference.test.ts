import assert from "node:assert/strict";
import { test } from "node:test";
import { blasRefusal, describeBlas, type TorchAbout } from "../../tools/bench/trainer-torch.js";

const about = (blas: Partial<TorchAbout["blas"]>): TorchAbout => ({
  torch: "1.13.0a0",
  threads: 2,
  blas: { built_with: "generic", library: "", kind: "unknown", detail: "", ...blas },
});

test("the trainer bench takes a ratio against PyTorch only on an optimised BLAS, and otherwise says what to install", () => {
  const openblas = about({
    kind: "openblas",
    library: "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    detail: "OpenBLAS 0.3.21 DYNAMIC_ARCH Haswell, 2 threads",
  });
  assert.equal(blasRefusal(openblas), undefined);
  assert.match(
    describeBlas(openblas),
    /^OpenBLAS 0\.3\.21 .*\(libblas\.so\.3 -> .*openblas-pthread\/libblas\.so\.3\); torch built with BLAS_INFO=generic$/,
  );
  assert.equal(blasRefusal(about({ kind: "mkl", detail: "MKL, linked into torch" })), undefined);
  assert.equal(blasRefusal(about({ kind: "blis", detail: "BLIS 0.9.0" })), undefined);

  const reference = blasRefusal(about({ kind: "reference", library: "/usr/lib/x86_64-linux-gnu/blas/libblas.so.3.11.0" }))!;
  assert.match(
    reference,
    /^refused: PyTorch runs on the reference BLAS \(netlib; libblas\.so\.3 -> \/usr\/lib\/x86_64-linux-gnu\/blas\/libblas\.so\.3\.11\.0\)/,
  );
  assert.match(reference, /apt-get install libopenblas0-pthread/);
  assert.match(reference, /update-alternatives --set libblas\.so\.3-x86_64-linux-gnu .*openblas-pthread/);
  assert.match(
    blasRefusal(about({ kind: "unknown", detail: "no libblas.so.3 loaded" }))!,
    /a BLAS this bench cannot name \(no libblas\.so\.3 loaded\)/,
  );
});
