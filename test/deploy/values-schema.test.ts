import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { VALUES_SCHEMA_PATH, valuesSchemaText } from "../../tools/deploy/values-schema.js";

test("values.schema.json is what tools/deploy/values-schema.ts generates from the run config schema", () => {
  assert.ok(
    readFileSync(VALUES_SCHEMA_PATH, "utf8") === valuesSchemaText(),
    "deploy/helm/saeflow/values.schema.json is stale (the run config schema or the chart keys changed); run: npx tsx tools/deploy/values-schema.ts",
  );
});
