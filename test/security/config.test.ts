import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { ConfigError, loadConfig } from "../../services/common/config/index.js";

const refusal = (fn: () => unknown): ConfigError => {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected ConfigError, got ${String(err)}`);
    return err;
  }
  assert.fail("config was accepted");
};

describe("security keys of the run config", () => {
  it("keeps plaintext gRPC and anonymous NATS as the default, with the role identities named", () => {
    const c = loadConfig();
    assert.equal(c.transport.tls.mode, "off");
    assert.deepEqual(
      [c.transport.tls.producers, c.transport.tls.trainers, c.transport.tls.operators, c.transport.tls.statusReaders],
      [["saeflow-producer"], ["saeflow-trainer"], ["saeflow-operator"], ["*"]],
    );
    assert.deepEqual([c.nats.user, c.nats.token, c.nats.credsFile, c.nats.tls.ca], ["", "", "", ""]);
  });

  it("takes every key from the env vars the chart sets", () => {
    const c = loadConfig({
      env: {
        SAEFLOW_TRANSPORT__TLS__MODE: "mtls",
        SAEFLOW_TRANSPORT__TLS__CERT: "/etc/saeflow/grpc-tls/tls.crt",
        SAEFLOW_TRANSPORT__TLS__KEY: "/etc/saeflow/grpc-tls/tls.key",
        SAEFLOW_TRANSPORT__TLS__CA: "/etc/saeflow/grpc-tls/ca.crt",
        SAEFLOW_TRANSPORT__TLS__HEALTH_ADDRESS: "0.0.0.0:8086",
        SAEFLOW_NATS__TOKEN_FILE: "/etc/saeflow/nats-auth/token",
        SAEFLOW_NATS__TLS__CA: "/etc/saeflow/nats-tls/ca.crt",
      },
    });
    assert.equal(c.transport.tls.mode, "mtls");
    assert.equal(c.transport.tls.healthAddress, "0.0.0.0:8086");
    assert.equal(c.nats.tokenFile, "/etc/saeflow/nats-auth/token");
    assert.equal(c.nats.tls.ca, "/etc/saeflow/nats-tls/ca.crt");
  });

  it("names what TLS and mTLS still need", () => {
    assert.deepEqual(refusal(() => loadConfig({ sets: ["transport.tls.mode=tls"] })).keys.sort(), [
      "transport.tls.cert",
      "transport.tls.key",
    ]);
    const mtls = refusal(() => loadConfig({ sets: ["transport.tls.mode=mtls", "transport.tls.cert=a.crt", "transport.tls.key=a.key"] }));
    assert.deepEqual(mtls.keys, ["transport.tls.ca"]);
    assert.match(mtls.message, /client certificates are checked against it/);
    assert.deepEqual(refusal(() => loadConfig({ sets: ["transport.tls.mode=on"] })).keys, ["transport.tls.mode"]);
    assert.deepEqual(refusal(() => loadConfig({ sets: ["transport.tls.operators=[]"] })).keys, ["transport.tls.operators"]);
  });

  it("refuses NATS credentials that mix ways or miss a part", () => {
    const mixed = refusal(() => loadConfig({ sets: ["nats.user=u", "nats.password=p", "nats.token=t"] }));
    assert.deepEqual(mixed.keys, ["nats.token"]);
    assert.match(mixed.message, /use one way to authenticate, not user and token/);
    assert.deepEqual(refusal(() => loadConfig({ sets: ["nats.password=p"] })).keys, ["nats.user"]);
    assert.deepEqual(refusal(() => loadConfig({ sets: ["nats.token=t", "nats.tokenFile=/t"] })).keys, ["nats.tokenFile"]);
    assert.deepEqual(refusal(() => loadConfig({ sets: ["nats.tls.cert=c.crt"] })).keys, ["nats.tls.key"]);
  });
});
