// One lint setup for the whole package: typescript-eslint's recommended rules, with `any` banned,
// and the house's layering (tools -> roles -> common -> gen; a role never imports another role).
import js from "@eslint/js";
import tseslint from "typescript-eslint";

const ROLES = ["buffer", "producer", "trainer"];

/** Relative imports that climb out of a folder into one of `targets` (services/<target>/...). */
const into = (targets, message) => ({
  "no-restricted-imports": ["error", { patterns: [{ regex: `^(\\.\\./)+(${targets.join("|")})/`, message }] }],
});

export default tseslint.config(
  { ignores: ["dist/**", "services/gen/**", "node_modules/**", "runs/**", ".cache/**", ".scratch/**", ".gpu/**", ".gl/**"] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      "@typescript-eslint/no-explicit-any": "error",
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_" }],
    },
  },
  ...ROLES.map((role) => ({
    files: [`services/${role}/**/*.ts`],
    rules: into(
      [...ROLES.filter((r) => r !== role), "tools"],
      "A role never imports another role (shared code belongs in services/common), nor tools/ (the image ships services/ alone).",
    ),
  })),
  {
    files: ["services/common/**/*.ts"],
    rules: into([...ROLES, "tools"], "services/common is shared by every role and imports none of them, nor tools/."),
  },
);
