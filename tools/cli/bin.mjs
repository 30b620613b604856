#!/usr/bin/env node
// The `saeflow` command: registers tsx (a runtime dependency) so the TypeScript CLI runs as is.
import { register } from "tsx/esm/api";

register();
await import("./main.ts");
